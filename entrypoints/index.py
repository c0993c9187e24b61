"""Build a search index into an exported model directory and measure its recall@10 against exact search.

    python -m entrypoints.index --model-dir OUTPUT/model --index hnsw [--vector-dtype int8] [--param M=32]
        [--data-dir PREPARED]   # recall on the validation split's users (default: the export's users)

The index file (faiss's binary format) and index.json are listed with their sha256 in the export's
manifest; the server answers with the default index (the last one built) under --search auto.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from twotower_lit.options import OneLineHelpFormatter
    from twotower_lit.export.search import KINDS, VECTOR_DTYPES

    parser = argparse.ArgumentParser(prog="python -m entrypoints.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=OneLineHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="exported model directory (OUTPUT/model)")
    parser.add_argument("--index", default="hnsw", choices=KINDS,
                        help="exact: every item scored; hnsw: faiss graph; ivf: faiss inverted lists (default: hnsw)")
    parser.add_argument("--vector-dtype", default="fp32", choices=VECTOR_DTYPES,
                        help="how the index stores the item vectors (fp16 / int8: scalar-quantised; default: fp32)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=INT",
                        help="an index parameter, repeatable: hnsw M, efConstruction, efSearch; ivf nlist, nprobe "
                             "(defaults: twotower_lit.export.index.default_params)")
    parser.add_argument("--data-dir", help="prepared data directory: recall is measured on its validation users")
    parser.add_argument("--recall-users", type=int, default=2000, help="most users recall is measured on (default: "
                                                                       "2000, a seeded sample)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="raise the search parameter (hnsw efSearch, ivf nprobe; unless --param gives it) until "
                             "recall@10 vs exact reaches this (default: 0.95; 0: keep the default)")
    parser.add_argument("--not-default", action="store_true",
                        help="add the index without making it the one --search auto answers with")
    parser.add_argument("--threads", type=int, help="faiss threads while building (default: every core)")
    args = parser.parse_args(argv)
    from twotower_lit.export.format import ArtifactError
    from twotower_lit.export.index import build_index, parse_params

    try:
        users = None
        if args.data_dir:
            from twotower_lit.serving.load import split_user_indices

            users = split_user_indices(args.data_dir, "val")
        entry = build_index(args.model_dir, args.index, parse_params(args.param), args.vector_dtype, users=users,
                            recall_users=args.recall_users, target_recall=args.target_recall or None,
                            default=not args.not_default, threads=args.threads,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ArtifactError, ValueError, OSError) as e:
        print(f"index: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(entry, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
