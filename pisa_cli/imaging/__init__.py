"""Files and pixels: finding inputs, reading and writing images, the PIL resizing steps.

No model code here.
"""
