"""The OHIF build this app serves at ``/ohif/``: MONAI Label 0.8.5's own build, with checked patches.

The build in the monailabel wheel (OHIF v3 ~3.10.0-beta.5 with the MONAI Label extension,
Apache-2.0) lacks what the annotation loop needs: its panel has no brush, eraser or Submit
(commented out upstream, and the upstream Submit reads a volume this build does not have), it
points at port 8000 whatever serves the page, it crashes when the server field is cleared, and it
shows a 7 s toast for a minute-long inference. The patches below are exact text replacements in
the wheel's (unminified) files; each must match exactly once, or building fails naming it. The
stock files are never modified: patched files are kept in memory and served in their place, every
other file is served from the wheel. ``python scripts/build_ohif.py DIR`` writes the same patched
build to a folder, for serving it elsewhere.
"""
from __future__ import annotations

import fnmatch
import hashlib
import mimetypes
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import monailabel

STOCK = Path(monailabel.__file__).resolve().parent / "endpoints" / "static" / "ohif"
ASSETS = Path(__file__).resolve().parents[1] / "ohif"


class PatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` by ``new`` in the one stock file whose name matches ``file`` (a glob: chunk
    names carry a content hash). ``why`` is said when the patch no longer applies."""
    file: str
    why: str
    old: str
    new: str


def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


PANEL_MODULE = ";// CONCATENATED MODULE: ../../../../extensions/monai-label/src/components/MonaiLabelPanel.tsx\n"
EXTENSION_CHUNK = "3933.bundle.*.js"
MONAI_MODE_CHUNK = "2068.bundle.*.js"  # the MONAI Label mode (monai-label route)


def patches() -> list[Patch]:
    return [
        Patch(EXTENSION_CHUNK, "the app's panel code, in the extension's module scope (react in scope)",
              PANEL_MODULE, _asset("fewshot_panel.js") + PANEL_MODULE),
        Patch(EXTENSION_CHUNK, "the server URL defaults to the page's own origin, not port 8000 of its host",
              "const _url = CookieUtils.getCookieString('MONAILABEL_SERVER_URL', 'http://' + window.location.host.split(':')[0] + ':8000/');",
              "const _url = fewshotOrigin(); // a cookie is per host, not per port: it would name another server"),
        Patch(EXTENSION_CHUNK, "an empty or partial server field gives no link instead of throwing in render (Info)",
              "href: new URL(this.state.url).toString() + 'info/',",
              "href: fewshotUrl(this.state.url, 'info/') || undefined,"),
        Patch(EXTENSION_CHUNK, "an empty or partial server field gives no link instead of throwing in render (Logs)",
              "href: new URL(this.state.url).toString() + 'logs/?lines=100',",
              "href: fewshotUrl(this.state.url, 'logs/?lines=100') || undefined,"),
        Patch(EXTENSION_CHUNK, "connecting to a field that is not a URL says so instead of an unhandled error",
              "      console.log('Connecting Server', url);\n      this.onInfo(url);",
              "      console.log('Connecting Server', url);\n      if (!fewshotUrl(url)) {\n"
              "        return;\n      }\n      this.onInfo(url);"),
        Patch(EXTENSION_CHUNK, "a server field that is not a URL is said under it",
              "    }, \"Logs\")))));\n  }\n}",
              "    }, \"Logs\"), fewshotUrl(this.state.url) ? null : react.createElement(\"span\", {\n"
              "      id: \"fewshot-bad-url\", style: { color: '#ff8080' }\n"
              "    }, \" The server field is not a URL, e.g. \" + fewshotOrigin())))));\n  }\n}"),
        Patch(EXTENSION_CHUNK, "the panel connects by itself once a series is shown",
              "    console.log('(Component Mounted) Ready to Connect to MONAI Server...');\n    // await this.onInfo();\n  }",
              "    console.log('(Component Mounted) Ready to Connect to MONAI Server...');\n    fewshotAutoConnect(this);\n"
              "    this.fewshotOnInfer = evt => this.setState({ fewshotRunning: evt.detail.running ? evt.detail : null });\n"
              "    window.addEventListener('fewshot-infer', this.fewshotOnInfer);\n  }\n"
              "  componentWillUnmount() {\n    this.fewshotUnmounted = true;\n"
              "    window.removeEventListener('fewshot-infer', this.fewshotOnInfer);\n  }"),
        Patch(EXTENSION_CHUNK, "the panel shows the running indicator and the correct-and-save section",
              "    })), isDataReady && /*#__PURE__*/react.createElement(\"div\", {\n      className: \"tabs scrollbar\",",
              "    })), this.state.fewshotRunning && react.createElement(FewshotRunning, {"
              " model: this.state.fewshotRunning.model, image: this.state.fewshotRunning.image, server: this.client().server_url.toString() }),"
              " isDataReady && react.createElement(FewshotCorrect, { panel: this }),"
              " isDataReady && /*#__PURE__*/react.createElement(\"div\", {\n      className: \"tabs scrollbar\","),
        Patch(EXTENSION_CHUNK, "a running inference keeps its notice until it ends, and the panel shows it",
              "        message: 'Running Auto-Segmentation...',\n        type: 'info',\n        duration: 7000\n      });",
              "        message: 'Running Auto-Segmentation... (the panel shows the elapsed time)',\n        type: 'info',\n"
              "        duration: 24 * 3600 * 1000\n      });"),
        Patch(EXTENSION_CHUNK, "a running inference (any tab) is announced to the panel, and asks for its answer on the viewer's grid",
              "    return await MonaiLabelClient.api_post(url, params, label, true, 'arraybuffer');",
              "    fewshotWithGrid(image, params);\n    fewshotInferring(model, image, true);\n    try {\n"
              "      return await MonaiLabelClient.api_post(url, params, label, true, 'arraybuffer');\n"
              "    } finally {\n      fewshotInferring(model, image, false);\n    }"),
        Patch(MONAI_MODE_CHUNK, "the MONAI Label mode no longer leaves behind a 'segmentationToolbox' section naming buttons it never "
              "registers (upstream commented out their addButtons): switching to the Segmentation mode, whose toolbox renders "
              "that stale section before its own onModeEnter, crashed the page (TypeError: Cannot destructure property 'id' "
              "of 'button') - the black screen",
              "      toolbarService.createButtonSection('segmentationToolbox', ['BrushTools', 'Shapes']);",
              "      // no 'segmentationToolbox' section: its buttons are not registered in this mode (apps/fewshot/lib/ohif.py)"),
        Patch(EXTENSION_CHUNK, "no training check on an app without trainers (its /train/ answers 404, an error in the console)",
              "    const training = await this.props.client().is_train_running();",
              "    const trainers = this.props.info.data.trainers || {};\n"
              "    const training = Object.keys(trainers).length ? await this.props.client().is_train_running() : false;"),
    ]


class PatchedBuild:
    """The stock build's files, with the patched ones held in memory (about 120 kB)."""

    def __init__(self, stock: Path = STOCK):
        self.stock = stock
        self._files: dict[str, bytes] | None = None
        self._lock = threading.Lock()

    def files(self) -> dict[str, bytes]:
        """Relative path -> patched content. Raises PatchError when a patch target is missing."""
        with self._lock:
            if self._files is None:
                self._files = build(self.stock)
            return self._files

    def etag(self, rel: str) -> str:
        return hashlib.sha256(self.files()[rel]).hexdigest()[:32]

    def resolve(self, path: str) -> tuple[str, Path | None]:
        """(relative path, stock file) for a request path; OHIF's own routes (``/ohif/viewer``,
        ``/ohif/monai-label?...``) get index.html, as the stock handler does."""
        rel = path.strip("/")
        target = (self.stock / rel).resolve() if rel else None
        if target is None or not target.is_relative_to(self.stock) or not target.is_file():
            rel, target = "index.html", self.stock / "index.html"
        return rel, target


def build(stock: Path = STOCK) -> dict[str, bytes]:
    if not (stock / "index.html").is_file():
        raise PatchError(f"MONAI Label's OHIF build is not at {stock}: is monailabel 0.8.5 installed?")
    texts: dict[str, str] = {}
    for patch in patches():
        names = [p.name for p in stock.iterdir() if fnmatch.fnmatch(p.name, patch.file)]
        if len(names) != 1:
            raise PatchError(f"OHIF patch '{patch.why}': {len(names)} files match {patch.file} in {stock}; expected one")
        name = names[0]
        text = texts.get(name)
        if text is None:
            text = (stock / name).read_text(encoding="utf-8")
        count = text.count(patch.old)
        if count != 1:
            raise PatchError(f"OHIF patch '{patch.why}': its target occurs {count} times in {name}, expected once "
                             "(a different monailabel version?)")
        texts[name] = text.replace(patch.old, patch.new)
    return {name: text.encode("utf-8") for name, text in texts.items()}


def write(dest: Path, stock: Path = STOCK) -> list[str]:
    """A full copy of the build with the patched files in place; returns the patched names."""
    patched = build(stock)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(stock, dest)
    for name, content in patched.items():
        (dest / name).write_bytes(content)
    return sorted(patched)


def media_type(path: Path) -> str:
    if path.suffix == ".wasm":
        return "application/wasm"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"
