"""One image in, one image out: the pipeline's stages (pipeline), building a pipeline
(loading), its plan from the image size and free memory (planning), stages that recover
from out-of-memory and inf/NaN (recovery), and the install checks (doctor).

Imports the engine, imaging and models; nothing here knows of folders, ranks or terminals.
"""
