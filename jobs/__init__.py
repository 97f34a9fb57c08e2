"""Ray job entrypoints: thin wrappers that parse arguments and call the library.

What `influcoder submit …` (or `ray job submit -- python -m jobs.<name> …`) runs on a cluster:
- `python -m jobs.gradients CONFIG [--split pool] [--out PATH_OR_URL] [--set key=value]…`
- `python -m jobs.embed CONFIG --encoder NAME_OR_PATH --out PATH_OR_URL [--prompt P] [--set key=value]…`
Run locally they start a local Ray, exactly like the `influcoder` commands.
"""
