"""Small settings per registered defence, so that each runs in seconds on the tiny SynthSigns run.

Repairing defences keep their held-out rule (two or three candidate values, so the trade-off curve is
written); a defence registered without an entry here runs with its defaults.
"""
FAST: dict[str, list[str]] = {
    "finetune": ["finetune.epochs=2", "finetune.grid=[1e-4,1e-3]"],
    "adv-pgd": ["adv-pgd.epochs=1", "adv-pgd.steps=2", "adv-pgd.grid=[1e-4,1e-3]"],
    "redteam": ["redteam.epochs=1", "redteam.restarts=1", "redteam.search_steps=15", "redteam.positions=[bottom_right,centre]",
                "redteam.grid=[1e-4,1e-3]"],
    "fine-prune": ["fine-prune.epochs=1", "fine-prune.step=0.1", "fine-prune.grid=[0.2,0.5]"],
    "anp": ["anp.epochs=4", "anp.grid=[0.6,0.8,0.95]"],  # 4 epochs leave every mask above 0.8; 0.95 prunes
    "nad": ["nad.teacher_epochs=1", "nad.epochs=1", "nad.grid=[1e-4,1e-3]"],
    "i-bau": ["i-bau.epochs=1", "i-bau.fixed_point_steps=2", "i-bau.grid=[1e-4,1e-3]"],
    "ft-sam": ["ft-sam.epochs=1", "ft-sam.grid=[1e-4,1e-3]"],
    "fst": ["fst.epochs=2", "fst.grid=[0.01,0.2]"],
    "neural-cleanse": ["neural-cleanse.top_k=0", "neural-cleanse.candidates=[0,1,2,3,4,5,7,13,14,38]",
                       "neural-cleanse.steps=60", "neural-cleanse.samples=128", "neural-cleanse.epochs=1"],
    "strip": ["strip.overlays=8"],
    "bti-dbf": ["bti-dbf.mask_epochs=2", "bti-dbf.gen_epochs=2"],
    "bti-dbf-u": ["bti-dbf-u.mask_epochs=1", "bti-dbf-u.gen_epochs=1", "bti-dbf-u.epochs=1", "bti-dbf-u.grid=[1e-4,1e-3]"],
    "pam": ["pam.mask_epochs=1", "pam.gen_epochs=1", "pam.epochs=1", "pam.grid=[1e-4,1e-3]"],
    "sau": ["sau.epochs=1", "sau.steps=2", "sau.grid=[1e-4,1e-3]"],
    "scan": [],
}


def fast(method: str) -> list[str]:
    return FAST.get(method, [])
