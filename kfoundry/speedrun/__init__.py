"""`kfoundry speedrun`: the whole pipeline on one machine, end to end, as a demo and a first lesson.

    corpus -> data/ (curated) -> tokenizer/ -> shards/ -> pretrain (ckpt/) -> samples -> eval/ -> sft/
           -> export/model-<type>.gguf -> export/hf (model card) + ledger verification -> report.md / report.json

The speedrun sits on top of the library and nothing in the library imports it. Each stage is one file that calls
only public entry points and returns what it adds to the report (its fields, and its markdown section):

    curate.py       `data prepare` into RUN/data (kfoundry.pipeline.ensure_curated)
    tokenizer.py    byte-level BPE on the curated corpus (kfoundry.pipeline.ensure_tokenizer)
    shards.py       token shards (kfoundry.pipeline.ensure_shards)
    pretrain.py     kfoundry.train.loop.pretrain, and the loss numbers the report's "Result" table shows
    samples.py      sampled continuations of a few Korean and English prompts
    eval.py         bits per byte and the offline KoBEST pack at a small limit (kfoundry.eval.runner.run_eval)
    sft.py          fine-tuning on the starter chat set; the same questions answered before and after
    gguf.py         the edge format (kfoundry.export.gguf.export_gguf) and a llama.cpp sample when it is installed
    provenance.py   the Hugging Face export with its model card, ledger verification, lineage
    report.py       report.json, report.md and loss.png, written once at the end
    run.py          the orchestrator: runs the stages in order, times each, writes the report
    cli.py          the `kfoundry speedrun` subcommand

`kfoundry.speedrun.run.speedrun(cfg, out)` runs it from Python.
"""

from kfoundry.speedrun.cli import register

__all__ = ["register"]
