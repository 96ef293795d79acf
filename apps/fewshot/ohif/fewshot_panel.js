
;// fewshot app (apps/fewshot/ohif/fewshot_panel.js), inserted by apps/fewshot/lib/ohif.py into the
// MONAI Label extension's chunk, so `react` and `hideNotification` are this module's. Plain
// react.createElement: no build step.
const fewshotH = react.createElement;
const FEWSHOT_SEGMENTATION = '1'; // the id the MONAI Label panel gives its one labelmap

// The server the page came from: MONAI Label serves OHIF at /ohif/ itself.
function fewshotOrigin() {
  return window.location.origin + '/';
}

// A server URL the user typed, or null: an empty or partial field must not throw in render.
function fewshotUrl(text, path) {
  try {
    return new URL(path || '', new URL(text)).toString();
  } catch (e) {
    return null;
  }
}

// The segments as this OHIF build shows them: segment index -> name (alphabetical, background 1).
function fewshotSegments(segmentationService) {
  const seg = segmentationService.getSegmentation(FEWSHOT_SEGMENTATION);
  const out = [];
  if (!seg || !seg.segments) {
    return out;
  }
  for (const s of Object.values(seg.segments)) {
    if (s && s.segmentIndex) {
      out.push({ index: s.segmentIndex, name: s.label });
    }
  }
  return out.sort((a, b) => a.index - b.index);
}

// The labelmap as painted, one byte per voxel in the volume's own order (x fastest), which is the
// order of the NRRD the server answered /infer with: the server reads it as OHIF's label.bin.
function fewshotLabelmap(segmentationService) {
  const volume = segmentationService.getLabelmapVolume(FEWSHOT_SEGMENTATION);
  if (!volume || !volume.voxelManager) {
    return null;
  }
  const values = volume.voxelManager.getCompleteScalarDataArray();
  const bytes = new Uint8Array(values.length);
  bytes.set(values);
  return bytes;
}

// Where the viewer's volume lies (cornerstone: dimensions, spacing, LPS origin, row/column/slice
// directions): the server turns a label onto its image's grid with it, and writes /infer answers on
// it, so a folder datastore's image may be stored in any axis order (apps/fewshot/lib/ohif_label.py).
function fewshotGrid(segmentationService) {
  const volume = segmentationService.getLabelmapVolume(FEWSHOT_SEGMENTATION);
  if (!volume || !volume.dimensions || !volume.direction) {
    return null;
  }
  return {
    dimensions: Array.from(volume.dimensions),
    spacing: Array.from(volume.spacing),
    origin: Array.from(volume.origin),
    direction: Array.from(volume.direction),
  };
}

// An /infer request from the panel carries the viewer's grid when it is about the series shown.
function fewshotWithGrid(image, params) {
  try {
    const panel = window.fewshotOhif && window.fewshotOhif.panel;
    const { displaySet } = panel.getActiveViewportInfo();
    if (displaySet && displaySet.SeriesInstanceUID === image) {
      const grid = fewshotGrid(panel.props.servicesManager.services.segmentationService);
      if (grid) {
        params.ohif_grid = grid;
      }
    }
  } catch (e) {
    // no panel or viewport yet: the server answers on the image's own grid
  }
  return params;
}

class FewshotCorrect extends react.Component {
  constructor(props) {
    super(props);
    // Painted from scratch, only the slices holding paint were looked at (the server's `partial`);
    // after a Run the whole volume was shown, and the saved label is complete.
    this.state = { tool: null, label: null, size: 10, saving: false, status: '', error: '', partial: true };
    this.onInferred = evt => {
      if (!evt.detail.running) {
        this.setState({ partial: false });
      }
    };
    this.onPartial = evt => this.setState({ partial: evt.target.checked });
    this.onTool = tool => {
      const { commandsManager } = this.props.panel.props;
      const names = { brush: 'CircularBrush', eraser: 'CircularEraser', navigate: 'WindowLevel' };
      commandsManager.runCommand('setToolActive', { toolName: names[tool] });
      if (tool !== 'navigate') {
        commandsManager.runCommand('setBrushSize', { value: this.state.size, toolNames: [names[tool]] });
        this.selectLabel(this.state.label || this.defaultLabel());
      }
      this.setState({ tool });
    };
    this.onSize = evt => {
      const size = Number(evt.target.value);
      this.setState({ size });
      const { commandsManager } = this.props.panel.props;
      commandsManager.runCommand('setBrushSize', { value: size, toolNames: ['CircularBrush', 'CircularEraser'] });
    };
    this.onLabel = evt => this.selectLabel(Number(evt.target.value));
    this.onSave = () => this.save();
    this.onNext = () => this.next();
  }

  componentDidMount() {
    window.addEventListener('fewshot-infer', this.onInferred);
  }

  componentWillUnmount() {
    window.removeEventListener('fewshot-infer', this.onInferred);
  }

  segments() {
    const { segmentationService } = this.props.panel.props.servicesManager.services;
    return fewshotSegments(segmentationService).filter(s => s.name !== 'background');
  }

  defaultLabel() {
    const segments = this.segments();
    return segments.length ? segments[0].index : null;
  }

  selectLabel(index) {
    if (!index) {
      return;
    }
    const { segmentationService } = this.props.panel.props.servicesManager.services;
    segmentationService.setActiveSegment(FEWSHOT_SEGMENTATION, index);
    this.setState({ label: index });
  }

  imageId() {
    const { displaySet } = this.props.panel.getActiveViewportInfo();
    return displaySet.SeriesInstanceUID;
  }

  async save() {
    const panel = this.props.panel;
    const { segmentationService } = panel.props.servicesManager.services;
    const label = fewshotLabelmap(segmentationService);
    if (!label) {
      this.setState({ error: 'Nothing to save: run the model or paint first.', status: '' });
      return;
    }
    const painted = new Set(label);
    painted.delete(0);
    const segments = fewshotSegments(segmentationService);
    // The server translates these numbers to its own labels by name; background is 0 on disk.
    const label_info = segments
      .filter(s => s.name !== 'background' && painted.has(s.index))
      .map(s => ({ name: s.name, segmentIndex: s.index }));
    const background = segments.find(s => s.name === 'background');
    if (background && painted.has(background.index)) {
      for (let i = 0; i < label.length; i++) {
        if (label[i] === background.index) {
          label[i] = 0;
        }
      }
    }
    this.setState({ saving: true, status: 'Saving…', error: '' });
    const image = this.imageId();
    const params = this.state.partial ? { label_info, partial: true } : { label_info };
    const grid = fewshotGrid(segmentationService);
    if (grid) {
      params.ohif_grid = grid;
    }
    const response = await panel.client().save_label(image, new Blob([label]), params);
    if (!response || response.status !== 200) {
      const detail = response && response.response && response.response.data ? response.response.data.detail : null;
      this.setState({ saving: false, status: '', error: 'Save failed: ' + (detail || (response && response.message) || 'no answer') });
      return;
    }
    const bank = response.data && response.data.support_bank;
    this.setState({
      saving: false,
      error: '',
      status: 'Saved as the final label of this series' + (this.state.partial ? ', annotated on its painted slices only' : '') +
        (bank ? ' (the bank takes it in now)' : '') + '.',
    });
    panel.props.servicesManager.services.uiNotificationService.show({
      title: 'MONAI Label', message: 'Final label saved', type: 'success', duration: 4000,
    });
  }

  async next() {
    const strategies = Object.keys(this.props.panel.state.info.data.strategies || {});
    const strategy = strategies.includes('bank_coverage') ? 'bank_coverage' : strategies[0];
    this.setState({ status: 'Asking ' + strategy + ' for the next study…', error: '' });
    const response = await this.props.panel.client().next_sample(strategy, {});
    if (!response || response.status !== 200 || !response.data || !(response.data.StudyInstanceUID || response.data.id)) {
      const detail = response && response.response && response.response.data ? response.response.data.detail : null;
      this.setState({ status: '', error: 'No next study: ' + (detail || (response && response.message) || 'every study is labelled') });
      return;
    }
    // A DICOMweb datastore names the study; a folder datastore gives the image id, which is the
    // series' SeriesInstanceUID: its study comes from the PACS OHIF reads (-c ohif_dicomweb).
    const study = response.data.StudyInstanceUID || (await this.studyOf(response.data.id));
    if (!study) {
      this.setState({ status: '', error: 'The next image, ' + response.data.id + ', is no series OHIF can open from its PACS' });
      return;
    }
    this.setState({ status: 'Opening the next study…' });
    const url = new URL(window.location.href);
    url.searchParams.set('StudyInstanceUIDs', study);
    window.location.assign(url.toString());
  }

  async studyOf(series) {
    if (!series) {
      return null;
    }
    const url = fewshotUrl(this.props.panel.client().server_url.toString(),
      'proxy/dicom/qido/series?SeriesInstanceUID=' + encodeURIComponent(series));
    const response = url ? await MonaiLabelClient.api_get(url) : null;
    const found = response && response.status === 200 && Array.isArray(response.data) ? response.data[0] : null;
    const study = found && found['0020000D'] && found['0020000D'].Value ? found['0020000D'].Value[0] : null;
    return study || null;
  }

  render() {
    const segments = this.segments();
    const label = this.state.label || this.defaultLabel();
    const button = (id, text, onClick, active, disabled) =>
      fewshotH('button', {
        id, className: 'actionButton', onClick, disabled,
        style: { margin: '2px', padding: '2px 6px', background: active ? '#5acce6' : undefined, color: active ? 'black' : undefined },
      }, text);
    return fewshotH('div', { className: 'fewshotCorrect', style: { color: 'white', fontSize: 'smaller', margin: '6px 0' } },
      fewshotH('p', { style: { fontWeight: 'bold', fontSize: '1.1em', margin: '4px 0' } }, 'Correct and save'),
      fewshotH('div', null,
        'Label: ',
        fewshotH('select', { id: 'fewshot-label', className: 'actionInput', style: { width: 'auto' }, value: label || '', onChange: this.onLabel },
          segments.map(s => fewshotH('option', { key: s.index, value: s.index }, s.index + ' ' + s.name)))),
      fewshotH('div', null,
        button('fewshot-brush', 'Brush', () => this.onTool('brush'), this.state.tool === 'brush'),
        button('fewshot-eraser', 'Eraser', () => this.onTool('eraser'), this.state.tool === 'eraser'),
        button('fewshot-navigate', 'Navigate', () => this.onTool('navigate'), this.state.tool === 'navigate'),
        ' size ',
        fewshotH('input', { id: 'fewshot-size', type: 'number', min: 1, max: 99, value: this.state.size, onChange: this.onSize, style: { width: '3.5em', color: 'black' } })),
      fewshotH('label', { style: { display: 'block' } },
        fewshotH('input', { id: 'fewshot-partial', type: 'checkbox', checked: this.state.partial, onChange: this.onPartial }),
        ' only the painted slices are annotated'),
      fewshotH('div', null,
        button('fewshot-save', this.state.saving ? 'Saving…' : 'Save final label', this.onSave, false, this.state.saving),
        button('fewshot-next', 'Next study', this.onNext, false, this.state.saving)),
      this.state.status ? fewshotH('p', { id: 'fewshot-status' }, this.state.status) : null,
      this.state.error ? fewshotH('p', { id: 'fewshot-error', style: { color: '#ff8080' } }, this.state.error) : null);
  }
}

// A persistent indicator while an inference runs (stock shows a 7 s toast for a 60-175 s job), with
// the server's progress (GET /fewshot/progress, see apps/fewshot/README.md) when it has one.
class FewshotRunning extends react.Component {
  constructor(props) {
    super(props);
    this.state = { seconds: 0, progress: null };
  }
  componentDidMount() {
    this.started = Date.now();
    this.timer = setInterval(() => this.tick(), 1000);
  }
  componentWillUnmount() {
    clearInterval(this.timer);
    this.timer = null;
  }
  async tick() {
    this.setState({ seconds: Math.round((Date.now() - this.started) / 1000) });
    if (this.polling || this.noProgress) {
      return;
    }
    this.polling = true;
    const url = fewshotUrl(this.props.server, 'fewshot/progress');
    const response = url ? await MonaiLabelClient.api_get(url) : null;
    this.polling = false;
    if (!response || response.status !== 200 || !response.data || !Array.isArray(response.data.inferences)) {
      this.noProgress = true; // a server without the progress route: the elapsed time only
      return;
    }
    const mine = response.data.inferences.filter(p => p.image === this.props.image && p.state !== 'done');
    if (this.timer) {
      this.setState({ progress: mine.length ? mine[mine.length - 1] : null });
    }
  }
  render() {
    const p = this.state.progress;
    let detail = '';
    if (p) {
      detail = p.stage + (p.total ? ' ' + p.done + '/' + p.total : '') + (p.eta ? ', about ' + Math.round(p.eta) + ' s left' : '');
    }
    return fewshotH('p', { id: 'fewshot-running', style: { color: '#5acce6', fontSize: 'smaller' } },
      'Running ' + this.props.model + '… ' + this.state.seconds + ' s' + (detail ? ' (' + detail + ')' : ''));
  }
}

// Connects by itself once the viewport shows a series: the panel's segmentation needs one.
function fewshotAutoConnect(panel) {
  let tries = 0;
  const attempt = () => {
    if (panel.fewshotUnmounted || panel.state.isDataReady) {
      return;
    }
    let ready = false;
    try {
      const { viewport, displaySet } = panel.getActiveViewportInfo();
      const { cornerstoneViewportService } = panel.props.servicesManager.services;
      ready = !!(displaySet && viewport && cornerstoneViewportService.getCornerstoneViewport(viewport.viewportId));
    } catch (e) {
      ready = false;
    }
    if (ready) {
      const url = panel.settings.current ? panel.settings.current.state.url : fewshotOrigin();
      panel.onInfo(url);
    } else if (tries++ < 240) {
      setTimeout(attempt, 500);
    }
  };
  window.fewshotOhif = { panel }; // for scripts and tests: the panel, its client and services
  setTimeout(attempt, 500);
}

// The panel hears when the Auto-Segmentation tab starts and ends an inference.
function fewshotInferring(model, image, running) {
  window.dispatchEvent(new CustomEvent('fewshot-infer', { detail: { model, image, running } }));
}
