"""Text models: a BERT encoder (``bert``), its tokenizer, pretrained import and a text corpus.

``bert`` is torch only and registered in the model zoo as arch ``bert``; ``tokenizer`` wraps the
HF ``tokenizers`` library; ``pretrained`` reads a sentence-transformers model directory or an
installed package; ``model`` pairs a module with its tokenizer for in-process use.
"""
