from signtrap.cli import main

raise SystemExit(main())
