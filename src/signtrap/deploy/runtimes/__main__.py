"""`python -m signtrap.deploy.runtimes > export/edge_bench.py`: print the assembled edge script."""
import sys

from signtrap.deploy.runtimes import assemble_edge_script

sys.stdout.write(assemble_edge_script())
