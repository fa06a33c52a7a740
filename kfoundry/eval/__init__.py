"""Evaluation: how good is the model, and how far from the frontier? (`kfoundry eval`, docs/eval.md)

    lm.py            the lm-eval adapter (`--model kfoundry`)       scoring.py   batched log-likelihood
    tasks/kobest/    the offline KoBEST task pack                   kobest.py    its TSV reader and prompts
    bpb.py           bits per byte per language                     contamination.py  n-gram overlap with shards
    frontier.yaml    published frontier scores, with sources        frontier.py  chance correction, % of frontier
    report.py        eval.json / .md / .html / .png                 runner.py    one evaluation, end to end
    plugin.py        how a bare `lm_eval` finds the adapter         cli.py       the command

Nothing is imported here: plugin.py runs at interpreter start-up (when its hook is installed) and must stay cheap.
"""
