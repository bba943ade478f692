"""Text models and everything they need besides torch: tokenizers, configs, corpora.

The BERT encoder (arch ``bert``): ``bert`` (the module), ``bert_config`` (its config, torch-free),
``tokenizer`` (HF ``tokenizers``), ``pretrained`` (reading a sentence-transformers directory or
package), ``model`` (module + tokenizer in process), ``corpus`` (the ``stdlib-docs`` dataset).
The GPT decoder (arch ``gpt``): ``gpt``, ``gpt_config``, ``byte_tokenizer``, ``gpt_corpus``,
``sampling``.
"""
