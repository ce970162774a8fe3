"""`pisa sweep`: the whole lambda plane of an image for the price of two UNet passes.

grid.py      the --lambda-grid syntax and the grid's points (no torch: the CLI checks it early)
core.py      one encode, both UNet passes, then each grid point decoded exactly; the
             pixel-space blend of the three basis images
run.py       images one by one into OUTDIR/<name>/, failures isolated, staged folders
files.py     the files of one image: point images, contact sheet, sweep.json, metrics, viewer
sheet.py     contact sheet and metric heat maps (Pillow)
metrics.py   PSNR/SSIM on Y (scikit-image), perceptual metrics through pyiqa when installed
viewer.py    the self-contained HTML viewer (template: viewer.html)

Nothing is imported here, so ``pisa --help`` stays free of torch.
"""
