"""The plumbing that the reading files (model.py, losses.py, data.py, train.py, finetune.py, flava.py) use: file
formats and their bad-input rules, tar shards, the tokenizer, the toy world, retrieval evaluation, process set-up,
the command line, the run folder and its log, released and exported weights, and the pictures a run draws.

Commands run from the repository root: `python -m lib.formats check`, `python -m lib.shards pack|index`,
`python -m lib.toyworld --out DIR`."""
