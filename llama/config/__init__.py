"""Every config, one package: `loader` reads YAML files, overrides and shipped configs by name; `schema` holds
the dtype table and the typed, range-checked fields; `model`, `train` and `pipeline` are the schemas of model
shapes (configs/model), training recipes (configs/train), and data and pipeline configs (configs/data,
configs/pipeline). A misspelt key or a value out of range is a one-line error before anything runs.
"""
