"""The engine's old module name, kept so that code written against it still imports: new code
imports ``fewshot.engine`` (``Engine``), ``fewshot.segmentation`` (what a call takes and returns),
``fewshot.files`` (``content_sha256``, ``file_stamp``, ``same_content``) and ``fewshot.config``
(``settings_hash``). Nothing in this repository imports it (tests/test_structure.py)."""
from fewshot.config import settings_hash  # noqa: F401
from fewshot.engine import Engine, Progress  # noqa: F401
from fewshot.files import content_sha256, file_stamp, same_content  # noqa: F401
from fewshot.segmentation import IngestReport, PreparedVolume, SegmentOptions, Segmentation  # noqa: F401
