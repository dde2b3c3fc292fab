import warnings

# fastai 2.8's layers.py decorates its activations with torch.jit.script at import, which torch 2.10 deprecates: a
# two-line FutureWarning in every stage's log that no user of this pipeline can act on. Here, before fastai loads.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
