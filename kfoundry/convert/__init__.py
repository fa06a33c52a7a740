"""Commands that read one checkpoint and write another: depth up-scaling (`kfoundry upscale`) and the import of
outside weights (`kfoundry import hf`). They sit above kfoundry/checkpoint and kfoundry/provenance (they write
checkpoints and ledger entries), while the pure tensor transforms they use stay in kfoundry/model.
"""
