"""Few-shot medical image segmentation: retrieve labelled slices, match them, transfer their masks.

The engine has no MONAI Label imports; ``apps/fewshot`` wraps it for MONAI Label.
"""
__version__ = "0.1.0"

import logging as _logging
import warnings as _warnings

# Messages a user reads as errors but that concern nothing they can act on: MONAI warns twice per
# file read (and once more as a Python warning) that NVIDIA's nvImageCodec, a GPU decoder for
# compressed DICOM, is absent; faiss logs, before loading its generic build, that its AVX2 build
# could not be loaded (this wheel ships none). Lower these loggers' levels again to see them.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
