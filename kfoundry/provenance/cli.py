"""`kfoundry provenance verify RUN_OR_CKPT` and `kfoundry provenance audit --model A --against B [C ...]`."""

from __future__ import annotations

import argparse
import json

from kfoundry.provenance.audit import audit, format_comparison
from kfoundry.provenance.verify import format_report, verify


def register(sub: argparse._SubParsersAction) -> None:
    prov = sub.add_parser("provenance", help="verify the ledger and lineage of a model; audit it against others")
    actions = prov.add_subparsers(dest="provenance_action", metavar="ACTION", required=True)

    v = actions.add_parser("verify", help="check the hash chain and every recorded file; print the lineage")
    v.add_argument("target", metavar="RUN_OR_CKPT", help="a run directory (with ledger.jsonl) or a checkpoint")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--no-rederive", action="store_true",
                   help="do not rebuild the initial weights from the recorded seed to check their hash")
    v.set_defaults(func=_verify)

    a = actions.add_parser("audit", help="compare weight fingerprints with other models against a chance baseline")
    a.add_argument("--model", required=True, help="the model to audit (kfoundry checkpoint or Hugging Face dir)")
    a.add_argument("--against", required=True, nargs="+", metavar="MODEL", help="one or more models to compare with")
    a.add_argument("--out", default="provenance-audit", help="folder for audit.json, audit.md and the plots")
    a.add_argument("--seeds", type=int, default=4, help="independently initialised models per side for chance")
    a.add_argument("--seed", type=int, default=0, help="random seed of the chance baseline (the report is "
                                                       "reproducible from it)")
    a.add_argument("--reference", nargs="+", default=[], metavar="MODEL",
                   help="models trained independently of all the others (ideally on similar data): their "
                        "similarity to each side joins the chance baseline")
    a.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    a.set_defaults(func=_audit)


def _verify(args) -> int:
    report = verify(args.target, rederive=not args.no_rederive)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0 if report.ok else 1


def _audit(args) -> int:
    results = audit(args.model, args.against, out_dir=args.out, seeds=args.seeds, seed=args.seed,
                    references=args.reference)
    if args.json:
        print(json.dumps([c.to_dict() for c in results], indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_comparison(c) for c in results))
        print(f"\nreport: {args.out}/audit.md")
    return 0
