"""gpstoken's torch-free core: what the torch library, the exporter and the slim runtime share.

Nothing here imports torch; every module works on numpy arrays (the sampler math works on any array
namespace that offers the few functions it uses, so torch tensors pass through it too).
"""
