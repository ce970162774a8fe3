"""Files and pixels: finding inputs (discover), decoding every mode and writing every format
atomically (io, modes, formats, deep, codecs16), the output folder's manifest, the
read-ahead and write-behind threads (stream), the PIL resizing steps (resize).

No model code here.
"""
