"""Integrations with the training stacks people already use (optional extras): ``hf`` (Hugging Face
``Trainer``), ``lightning`` (Lightning). Import the submodule you need; nothing here is imported by
``import flatminima``."""
