"""Model weights: read any supported format tensor by tensor, write verified folders, load a model.

    source = open_checkpoint(path, model_config=None)   # Source: MindFormers names -> lazy tensors + config
    manifest = write_checkpoint(source, out_dir, fmt="ckpt" | "safetensors" | "hf", tokenizer=None)
    model, config = load_checkpoint(path, model_config=None, dtype=None)
    save_checkpoint(model_or_params, out_dir, config, fmt="ckpt", tokenizer=None)

Modules (import from them; this package imports none, so that `convert --help` and callers that only read
or write files never load MindSpore):
- names: parameter names, `expected_shapes(config)`, dtype tables, folder file names (numpy only).
- entry: `Entry`, a lazily read tensor; the q/k permutation of interleaved rotary layouts.
- safetensors, mindspore_ckpt, torch_pickle, meta, llama2c, gguf: one format each.
- source: `Source`, `open_checkpoint` (which format is at a path), `check_tensors`, `verify_folder`.
- writer: `write_checkpoint`.
- load: `load_checkpoint`, `assign_weights`, `params_source`, `save_checkpoint` (the MindSpore side).
- cli: the `llama2-pipeline convert` command.

Readers (`open_checkpoint` picks one from what it finds at `path`):
- Hugging Face folder or file: `model.safetensors`, sharded with `model.safetensors.index.json`, or
  `pytorch_model.bin[.index.json]` (only where torch is installed; loaded with weights_only=True).
- Meta `consolidated.*.pth` + `params.json` (torch, same rule; model-parallel shards are concatenated).
- llama2.c `.bin`, version 0 ("legacy") export: 7-int32 header, then float32 weights.
- llama.cpp `.gguf` of the llama architecture, with its tokenizer.
- MindSpore/MindFormers `.ckpt` or `.safetensors` with MindFormers names, or a folder written here.
Meta, llama2.c and GGUF store q/k rows in the interleaved rotary layout; they are permuted to the rotate-half
layout of Hugging Face and MindFormers (which differ from each other only in names).

Folder layout written by `write_checkpoint` (one rename, so a reader never sees half of it):
    mindspore:   model.ckpt | model.safetensors (or model-00001-of-0000N.*), model_config.json,
                 [tokenizer files], manifest.json
    huggingface: model.safetensors (or shards + model.safetensors.index.json), config.json,
                 generation_config.json, [tokenizer files], manifest.json
The tokenizer files are those found next to the source weights or given (`llama.data.tokenizer.TOKENIZER_FILES`:
tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json).
`manifest.json` holds the size and sha256 of every file; `open_checkpoint` checks them before reading.

Memory: tensors stored as-is are copied file to file through one small buffer; a tensor that must change
(q/k permutation, dtype cast, Meta shard concatenation) is read whole only when written and dropped after,
so peak memory stays near the largest such tensor. The .ckpt and .safetensors containers are parsed and written
here (both are simple: a protobuf stream and a JSON header), because MindSpore's and safetensors' own
savers need the whole model in memory at once; the tests read our files back with both libraries.
"""
