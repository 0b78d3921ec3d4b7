"""seqpar.data: tokenizers, Megatron-format token stores, ``prepare``, and stream packing.

Modules (import them directly; this package imports nothing eagerly, and megatron-core is
loaded only when a store is opened or written):

- ``tokenizer``: ``ByteTokenizer``, ``HFTokenizer``, ``load_tokenizer(spec, eot_id)``
- ``store``: ``TokenStore(prefix)``, ``write_store(prefix, docs, vocab_size)``, ``StoreError``
- ``prepare``: ``prepare(inputs, output, tokenizer, ...)``, ``read_metadata(prefix)``
- ``corpus``: ``embedded_corpus(cache_dir, progress)``, the stdlib-sources default corpus
- ``streams``: ``PackedStreams(store, mode, seq_len, seed, doc_mask)[i] -> Stream``
- ``decompose``: ``decompose_store(prefix, output_dir, ...)``, ``load_manifest(dir)`` (dataset decomposition)
- ``curriculum``: ``bucket_schedule(...)``, ``DecomposedBatches(dir, ...).step_streams(step)``
- ``varlen``: ``VarlenSteps(store, ...)``: whole documents per step (adaptive scattering's input)
"""
