"""gptpkg: a GPT-2-style model from scratch, trained and served as an MLOps pipeline.

Importing the package is cheap: submodules (torch-heavy or not) load on demand, so the
serving side can use `gptpkg.tokenizer` without importing torch.
"""

__version__ = "0.1.0"
