// Time charts on a canvas: lines, stacked areas and histogram heatmaps, with
// hover values, a legend that toggles series, drag to zoom and annotations
// (deploys, restarts, scaling, alerts) drawn as marks on the time axis.

const PALETTE = ['#2f81f7', '#e16f24', '#3fb950', '#bf4b8a', '#d29922', '#8957e5',
  '#1b7c83', '#cf222e', '#6e7781', '#a371f7', '#56d364', '#db6d28'];

export const ANNOTATION_COLORS = {
  deploy: '#8957e5', restart: '#cf222e', scale: '#1b7c83', alert: '#d29922', other: '#6e7781',
};

/// The unit a series is in, from its metric name or the query's text.
export function unitOf(text) {
  if (/_bytes\b|_bytes_total\b|memory/.test(text) && !/rate\(|irate\(/.test(text)) return 'bytes';
  if (/_bytes/.test(text)) return 'bytes/s';
  if (/histogram_quantile|_seconds\b|_seconds_(sum|bucket)\b|duration/.test(text) && !/_seconds_total/.test(text)) return 'seconds';
  if (/_ratio\b|percent|error_rate/.test(text)) return 'percent';
  return '';
}

function trim(n) {
  return String(+n.toPrecision(3));
}

/// A value with its unit, short (axis ticks, tooltips).
export function formatValue(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (!Number.isFinite(v)) return v > 0 ? '+Inf' : '-Inf';
  const a = Math.abs(v);
  switch (unit) {
    case 'bytes':
    case 'bytes/s': {
      const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
      let x = v, i = 0;
      while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i++; }
      return trim(x) + ' ' + units[i] + (unit === 'bytes/s' ? '/s' : '');
    }
    case 'seconds':
      if (a === 0) return '0 s';
      if (a < 1e-3) return trim(v * 1e6) + ' µs';
      if (a < 1) return trim(v * 1e3) + ' ms';
      if (a < 120) return trim(v) + ' s';
      if (a < 7200) return trim(v / 60) + ' min';
      return trim(v / 3600) + ' h';
    case 'percent':
      return trim(v * 100) + '%';
    case '%':
      return trim(v) + '%';
    default:
      if (a >= 1e9) return trim(v / 1e9) + 'G';
      if (a >= 1e6) return trim(v / 1e6) + 'M';
      if (a >= 1e4) return trim(v / 1e3) + 'k';
      return trim(v);
  }
}

/// A series' name from its labels, as Prometheus' UI writes it.
export function seriesName(metric) {
  const name = metric.__name__ || '';
  const rest = Object.keys(metric).filter(k => k !== '__name__').sort()
    .map(k => `${k}="${metric[k]}"`);
  return rest.length ? `${name}{${rest.join(', ')}}` : (name || '{}');
}

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200,
  10800, 21600, 43200, 86400, 172800, 604800].map(s => s * 1000);

function timeLabel(ms, span) {
  const d = new Date(ms);
  const p = n => String(n).padStart(2, '0');
  if (span > 2 * 86400e3) return `${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
  if (span > 600e3) return `${p(d.getHours())}:${p(d.getMinutes())}`;
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || '#888';
}

function kindOf(event) {
  return event.group || 'other';
}

export class Chart {
  /// `opts`: title, unit, stacked, heatmap, height, onZoom(startMs, endMs).
  constructor(parent, opts = {}) {
    this.opts = opts;
    this.root = document.createElement('figure');
    this.root.className = 'chart';
    if (opts.title) {
      const cap = document.createElement('figcaption');
      cap.textContent = opts.title;
      this.root.append(cap);
    }
    this.canvas = document.createElement('canvas');
    this.canvas.setAttribute('role', 'img');
    this.canvas.setAttribute('aria-label', opts.title || 'time chart');
    this.canvas.height = opts.height || 220;
    this.tip = document.createElement('div');
    this.tip.className = 'tip';
    this.tip.hidden = true;
    this.legend = document.createElement('div');
    this.legend.className = 'legend';
    const wrap = document.createElement('div');
    wrap.className = 'plot';
    wrap.append(this.canvas, this.tip);
    this.root.append(wrap, this.legend);
    parent.append(this.root);
    this.series = [];
    this.hidden = new Set();
    this.annotations = [];
    this.drag = null;
    this.canvas.addEventListener('mousemove', e => this.hover(e));
    this.canvas.addEventListener('mouseleave', () => { this.tip.hidden = true; this.drag = null; this.draw(); });
    this.canvas.addEventListener('mousedown', e => { this.drag = { x0: this.px(e), x1: this.px(e) }; });
    this.canvas.addEventListener('mouseup', e => this.endDrag(e));
    this.resize = () => this.draw();
    window.addEventListener('resize', this.resize);
    // Every chart on the page, for the browser tests and the console.
    (window.capstanCharts = window.capstanCharts || []).push(this);
  }

  px(e) {
    return e.clientX - this.canvas.getBoundingClientRect().left;
  }

  /// `series`: [{name, points: [[ms, value]], labels}], `start`/`end` in ms,
  /// `annotations`: [{time_ms, group, text}].
  set(series, start, end, annotations = []) {
    this.series = series.map((s, i) => ({ ...s, color: PALETTE[i % PALETTE.length] }));
    this.start = start;
    this.end = end;
    this.annotations = annotations;
    this.renderLegend();
    const t0 = performance.now();
    this.draw();
    this.lastDrawMs = performance.now() - t0;
    this.root.dataset.series = String(this.series.length);
    this.root.dataset.marks = String((this.marks || []).length);
    return this.lastDrawMs;
  }

  renderLegend() {
    this.legend.replaceChildren();
    if (this.opts.heatmap) return;
    for (const s of this.series.slice(0, 200)) {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'key';
      b.setAttribute('aria-pressed', String(!this.hidden.has(s.name)));
      b.title = 'show or hide this series';
      const sw = document.createElement('span');
      sw.className = 'swatch';
      sw.style.background = s.color;
      b.append(sw, document.createTextNode(s.name));
      b.addEventListener('click', ev => {
        if (ev.shiftKey || ev.metaKey || ev.ctrlKey) {
          if (this.hidden.has(s.name)) this.hidden.delete(s.name); else this.hidden.add(s.name);
        } else {
          // A plain click shows only this series; clicking it again shows all.
          const only = this.series.every(o => o === s || this.hidden.has(o.name)) && !this.hidden.has(s.name);
          this.hidden = new Set(only ? [] : this.series.filter(o => o !== s).map(o => o.name));
        }
        this.renderLegend();
        this.draw();
      });
      this.legend.append(b);
    }
    if (this.series.length > 200) {
      const more = document.createElement('span');
      more.className = 'dim';
      more.textContent = ` and ${this.series.length - 200} more series`;
      this.legend.append(more);
    }
  }

  visible() {
    return this.series.filter(s => !this.hidden.has(s.name));
  }

  /// Points of the visible series, summed when stacked.
  layers() {
    const vis = this.visible();
    if (!this.opts.stacked) return vis.map(s => ({ s, pts: s.points, base: null }));
    const acc = new Map();
    return vis.map(s => {
      const base = s.points.map(([t]) => acc.get(t) || 0);
      const pts = s.points.map(([t, v], i) => {
        const y = base[i] + (Number.isFinite(v) ? v : 0);
        acc.set(t, y);
        return [t, y];
      });
      return { s, pts, base };
    });
  }

  geometry() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, this.canvas.parentElement.clientWidth || 600);
    const h = this.opts.height || 220;
    if (this.canvas.width !== Math.round(w * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
      this.canvas.style.width = w + 'px';
      this.canvas.style.height = h + 'px';
    }
    return { dpr, w, h, left: 64, right: 8, top: 8, bottom: 30 };
  }

  draw() {
    const g = this.geometry();
    const ctx = this.canvas.getContext('2d');
    ctx.setTransform(g.dpr, 0, 0, g.dpr, 0, 0);
    ctx.clearRect(0, 0, g.w, g.h);
    const fg = css('--dim'), grid = css('--line');
    ctx.font = '11px system-ui, sans-serif';
    const pw = g.w - g.left - g.right, ph = g.h - g.top - g.bottom;
    const span = Math.max(1, this.end - this.start);
    const x = t => g.left + ((t - this.start) / span) * pw;
    this.x = x;
    this.g = g;
    // The time axis.
    const tstep = TIME_STEPS.find(s => s >= span / Math.max(2, pw / 90)) || TIME_STEPS[TIME_STEPS.length - 1];
    const tz = new Date().getTimezoneOffset() * 60e3;
    ctx.fillStyle = fg;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.textAlign = 'center';
    for (let t = Math.ceil((this.start - tz) / tstep) * tstep + tz; t <= this.end; t += tstep) {
      const xx = Math.round(x(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(xx, g.top); ctx.lineTo(xx, g.top + ph); ctx.stroke();
      const label = timeLabel(t, span);
      const half = ctx.measureText(label).width / 2;
      if (xx - half >= 0 && xx + half <= g.w) ctx.fillText(label, xx, g.h - 12);
    }
    if (this.opts.heatmap) this.drawHeatmap(ctx, g, x, pw, ph, fg, grid);
    else this.drawLines(ctx, g, x, ph, fg, grid);
    // Annotations: a dashed line and a mark on the axis.
    this.marks = [];
    for (const a of this.annotations) {
      if (a.time_ms < this.start || a.time_ms > this.end) continue;
      const xx = Math.round(x(a.time_ms)) + 0.5;
      const color = ANNOTATION_COLORS[kindOf(a)] || ANNOTATION_COLORS.other;
      ctx.strokeStyle = color;
      ctx.setLineDash([3, 3]);
      ctx.beginPath(); ctx.moveTo(xx, g.top); ctx.lineTo(xx, g.top + ph); ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = color;
      ctx.beginPath();
      ctx.moveTo(xx, g.top + ph); ctx.lineTo(xx - 4, g.top + ph + 7); ctx.lineTo(xx + 4, g.top + ph + 7);
      ctx.fill();
      this.marks.push({ x: xx, a });
    }
    if (this.drag) {
      ctx.fillStyle = 'rgba(47,129,247,0.15)';
      const a = Math.min(this.drag.x0, this.drag.x1), b = Math.max(this.drag.x0, this.drag.x1);
      ctx.fillRect(a, g.top, b - a, ph);
    }
    if (this.cursor !== undefined) {
      ctx.strokeStyle = fg;
      ctx.beginPath(); ctx.moveTo(this.cursor + 0.5, g.top); ctx.lineTo(this.cursor + 0.5, g.top + ph); ctx.stroke();
    }
  }

  drawLines(ctx, g, x, ph, fg, grid) {
    const layers = this.layers();
    let lo = Infinity, hi = -Infinity;
    for (const { pts } of layers) for (const [, v] of pts) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
    if (this.opts.stacked || lo > 0) lo = Math.min(0, lo);
    if (hi === lo) hi = lo + 1;
    const vstep = niceStep(hi - lo, ph / 40);
    hi = Math.ceil(hi / vstep) * vstep;
    lo = Math.floor(lo / vstep) * vstep;
    const y = v => g.top + ph - ((v - lo) / (hi - lo)) * ph;
    this.y = y;
    ctx.textAlign = 'right';
    ctx.fillStyle = fg;
    for (let v = lo; v <= hi + vstep / 2; v += vstep) {
      const yy = Math.round(y(v)) + 0.5;
      ctx.strokeStyle = grid;
      ctx.beginPath(); ctx.moveTo(g.left, yy); ctx.lineTo(g.w - g.right, yy); ctx.stroke();
      ctx.fillText(formatValue(v, this.opts.unit), g.left - 6, yy + 4);
    }
    // A gap wider than twice the step breaks a line.
    const gap = (this.step || 0) * 2.5;
    for (let li = layers.length - 1; li >= 0; li--) {
      const { s, pts, base } = layers[li];
      if (this.opts.bars) {
        // A histogram: one bar per step.
        const bw = Math.max(1, (x(this.start + (this.step || 1000)) - x(this.start)) - 1);
        ctx.fillStyle = s.color;
        pts.forEach(([t, v], i) => {
          if (!Number.isFinite(v)) return;
          const b = base ? base[i] : 0;
          ctx.fillRect(x(t) - bw, y(v), bw, y(b) - y(v));
        });
        continue;
      }
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let prev = null;
      const lone = [];
      pts.forEach(([t, v], i) => {
        if (!Number.isFinite(v)) { prev = null; return; }
        const xx = x(t), yy = y(v);
        const starts = prev === null || (gap && t - prev > gap);
        if (starts) ctx.moveTo(xx, yy); else ctx.lineTo(xx, yy);
        const next = pts[i + 1];
        // A point with no neighbour draws as a dot.
        if (starts && !(next && Number.isFinite(next[1]) && !(gap && next[0] - t > gap))) lone.push([xx, yy]);
        prev = t;
      });
      ctx.stroke();
      ctx.fillStyle = s.color;
      for (const [xx, yy] of lone) { ctx.beginPath(); ctx.arc(xx, yy, 2, 0, 2 * Math.PI); ctx.fill(); }
      if (base && pts.length) {
        ctx.globalAlpha = 0.25;
        ctx.fillStyle = s.color;
        ctx.beginPath();
        pts.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
        for (let i = pts.length - 1; i >= 0; i--) ctx.lineTo(x(pts[i][0]), y(base[i]));
        ctx.closePath();
        ctx.fill();
        ctx.globalAlpha = 1;
      }
    }
    this.layersCache = layers;
  }

  /// `*_bucket` series by `le`: each cell is the share of observations that
  /// fell in that bucket in that step, from the cumulative counts.
  drawHeatmap(ctx, g, x, pw, ph, fg) {
    const rows = this.series
      .map(s => ({ s, le: parseFloat(s.labels.le === '+Inf' ? 'Infinity' : s.labels.le) }))
      .filter(r => !Number.isNaN(r.le))
      .sort((a, b) => a.le - b.le);
    this.rows = rows;
    if (!rows.length) return;
    const times = [...new Set(rows.flatMap(r => r.s.points.map(p => p[0])))].sort((a, b) => a - b);
    const at = rows.map(r => new Map(r.s.points));
    let max = 0;
    const cells = times.map(t => rows.map((r, i) => {
      const v = (at[i].get(t) || 0) - (i ? at[i - 1].get(t) || 0 : 0);
      max = Math.max(max, v);
      return v;
    }));
    this.cells = { times, cells };
    const rh = ph / rows.length;
    const cw = Math.max(1, pw / Math.max(1, times.length));
    const accent = css('--accent');
    times.forEach((t, ti) => rows.forEach((r, i) => {
      const v = cells[ti][i];
      if (v <= 0) return;
      ctx.globalAlpha = 0.15 + 0.85 * (v / max);
      ctx.fillStyle = accent;
      ctx.fillRect(x(t) - cw / 2, g.top + ph - (i + 1) * rh, cw, rh);
    }));
    ctx.globalAlpha = 1;
    ctx.fillStyle = fg;
    ctx.textAlign = 'right';
    const every = Math.ceil(rows.length / (ph / 14));
    rows.forEach((r, i) => {
      if (i % every) return;
      ctx.fillText(r.le === Infinity ? '+Inf' : formatValue(r.le, this.opts.unit), g.left - 6, g.top + ph - i * rh - rh / 2 + 4);
    });
  }

  timeAt(px) {
    const g = this.g;
    return this.start + ((px - g.left) / (g.w - g.left - g.right)) * (this.end - this.start);
  }

  hover(e) {
    const px = this.px(e);
    if (this.drag) {
      this.drag.x1 = px;
      this.draw();
      return;
    }
    this.cursor = px;
    this.draw();
    // Every event marked under the pointer (several can share a pixel).
    const near = (this.marks || []).filter(m => Math.abs(m.x - px) <= 4);
    const lines = [];
    if (near.length) {
      for (const m of near.slice(-6)) {
        lines.push([`${new Date(m.a.time_ms).toLocaleTimeString()} ${m.a.service}`, ANNOTATION_COLORS[kindOf(m.a)]]);
        lines.push([m.a.text, null]);
      }
      if (near.length > 6) lines.push([`… ${near.length - 6} more`, null]);
    } else if (this.opts.heatmap && this.cells) {
      const t = this.timeAt(px);
      const { times, cells } = this.cells;
      let best = 0;
      times.forEach((tt, i) => { if (Math.abs(tt - t) < Math.abs(times[best] - t)) best = i; });
      if (times.length) {
        lines.push([new Date(times[best]).toLocaleTimeString(), null]);
        this.rows.forEach((r, i) => {
          if (cells[best][i] > 0) lines.push([`≤ ${r.le === Infinity ? '+Inf' : formatValue(r.le, this.opts.unit)}: ${formatValue(cells[best][i], '')}`, null]);
        });
      }
    } else if (this.layersCache) {
      const t = this.timeAt(px);
      const rows = [];
      let when = null;
      for (const { s, pts } of this.layersCache) {
        let best = null;
        for (const p of pts) if (best === null || Math.abs(p[0] - t) < Math.abs(best[0] - t)) best = p;
        if (!best) continue;
        when = best[0];
        const raw = this.opts.stacked ? s.points.find(p => p[0] === best[0])?.[1] : best[1];
        rows.push([s.name, raw, s.color]);
      }
      rows.sort((a, b) => (b[1] ?? -Infinity) - (a[1] ?? -Infinity));
      if (when !== null) lines.push([new Date(when).toLocaleTimeString(), null]);
      for (const [name, v, color] of rows.slice(0, 12)) lines.push([`${name}: ${formatValue(v, this.opts.unit)}`, color]);
      if (rows.length > 12) lines.push([`… ${rows.length - 12} more`, null]);
    }
    if (!lines.length) { this.tip.hidden = true; return; }
    this.tip.replaceChildren(...lines.map(([text, color]) => {
      const d = document.createElement('div');
      if (color) {
        const sw = document.createElement('span');
        sw.className = 'swatch';
        sw.style.background = color;
        d.append(sw);
      }
      d.append(document.createTextNode(text));
      return d;
    }));
    this.tip.hidden = false;
    const left = Math.min(px + 12, this.g.w - 260);
    this.tip.style.left = Math.max(0, left) + 'px';
  }

  endDrag(e) {
    const d = this.drag;
    this.drag = null;
    if (!d) return;
    const a = Math.min(d.x0, this.px(e)), b = Math.max(d.x0, this.px(e));
    if (b - a >= 5 && this.opts.onZoom) this.opts.onZoom(Math.round(this.timeAt(a)), Math.round(this.timeAt(b)));
    else this.draw();
  }

  destroy() {
    window.removeEventListener('resize', this.resize);
    window.capstanCharts = window.capstanCharts.filter(c => c !== this);
    this.root.remove();
  }
}

/// A Prometheus matrix as chart series (values parsed, times in ms).
export function fromMatrix(result) {
  return result.map(r => ({
    name: seriesName(r.metric),
    labels: r.metric,
    points: r.values.map(([t, v]) => [t * 1000, parseFloat(v)]),
  }));
}
