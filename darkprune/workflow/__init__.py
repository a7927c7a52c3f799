"""The workflow layer: what the commands do, as functions over the library that read and write files.

workspace.py (the pruning workspace), settings.py (the one settings reader), steps.py (ana, prune, transform),
finetune_step.py (finetune with the numba engine or Darknet), darknet_handoff.py (training with Darknet itself),
sweep.py, timing.py (the one timing harness, ours against OpenCV), compress_step.py (compress/decompress),
images.py (run: detections drawn, classes named), inspect.py (info, eval). The command line (darkprune/cli/) is a
parser over these; nothing here imports it.
"""
