"""Provenance: prove what a model descends from, and check a model against others.

    ledger.py   ledger.jsonl: append-only, hash-chained entries (`record`, `read`, `check_chain`)
    record.py   what the stages call: record_init / record_data / record_checkpoint / record_evaluation /
                record_export (one line each, where the artefact is made)
    verify.py   `kfoundry provenance verify`: the chain, every recorded file, the initialisation, the lineage
    audit.py    `kfoundry provenance audit`: weight fingerprints against a chance baseline, layer pairing
    fingerprint.py           fingerprints no function-preserving reparametrization can move (token geometry,
                             aligned circuits) and the token matching by text
    fingerprint_disguise.py  those reparametrizations themselves, to check the claim on any model
    card.py     the model card (README.md, English and Korean) that `export hf` writes

Guide: docs/provenance.md (English), docs/provenance.ko.md (Korean).
"""

from kfoundry.provenance.ledger import LedgerError, check_chain, read, record
from kfoundry.provenance.record import (record_checkpoint, record_data, record_derivation, record_evaluation,
                                        record_export, record_init, model_digest)

__all__ = ["LedgerError", "check_chain", "read", "record", "record_checkpoint", "record_data", "record_derivation",
           "record_evaluation", "record_export", "record_init", "model_digest"]
