"""raytune_llm.packing: read, validate, tokenize and pack training data into fixed-length rows.

Modules: readers (JSONL / Parquet / HF dataset folders), formats (text, prompt/completion, alpaca,
chat), validate (DataError, bad-record policy), tokenizer (local BPE training, default chat
template), packer (best-fit-decreasing packing, resumable stream), stream (the file-to-rows
pipeline and its Ray Data form). Imports nothing at package import time; see docs/INTERFACES.md.
"""
