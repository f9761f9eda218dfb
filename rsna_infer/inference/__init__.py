"""The run: the engine that streams studies through the models, and its report."""
