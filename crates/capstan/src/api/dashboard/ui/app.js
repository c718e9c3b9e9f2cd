// The dashboard's pages. The overview, service and alert tables are rendered
// by the daemon (`#live`, refreshed in place); this module adds the time
// charts and the explore, logs and traces pages, all from the same read APIs
// Prometheus, Loki and Tempo clients use.

import { Chart, fromMatrix, unitOf, formatValue, seriesName } from './chart.js';

const main = document.getElementById('main');
const page = main.dataset.page;
const params = new URLSearchParams(location.search);

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}

async function api(path, query = {}) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query)) {
    if (Array.isArray(v)) v.forEach(x => u.searchParams.append(k, x));
    else if (v !== undefined && v !== null && v !== '') u.searchParams.set(k, v);
  }
  const r = await fetch(u, { credentials: 'same-origin' });
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch { body = null; }
  if (!r.ok) throw new Error((body && (body.error || body.message)) || text.trim() || r.statusText);
  return body;
}

function problem(parent, err) {
  parent.replaceChildren(el('p', { class: 'bad', role: 'alert', text: String(err.message || err) }));
}

const RANGES = { '5m': 300, '15m': 900, '1h': 3600, '3h': 10800, '6h': 21600, '12h': 43200, '1d': 86400, '7d': 604800 };
const REFRESH = { off: 0, '5s': 5, '15s': 15, '1m': 60 };

/// The page's time range, kept in the URL so a view can be shared.
const range = {
  name: params.get('range') || (page === 'logs' || page === 'traces' ? '1h' : '1h'),
  end: params.get('end') ? +params.get('end') : null,
  refresh: params.get('refresh') || (params.get('end') ? 'off' : '15s'),
  listeners: [],
  span() { return (RANGES[this.name] || 3600) * 1000; },
  bounds() {
    const end = this.end || Date.now();
    return [end - this.span(), end];
  },
  step() { return Math.max(1, Math.ceil(this.span() / 1000 / 240)); },
  zoom(a, b) {
    const span = (b - a) / 1000;
    this.name = Object.keys(RANGES).find(k => RANGES[k] >= span) || '7d';
    this.end = b;
    this.refresh = 'off';
    this.changed();
  },
  changed() {
    setParam('range', this.name);
    setParam('end', this.end);
    setParam('refresh', this.refresh === '15s' ? null : this.refresh);
    this.listeners.forEach(f => f());
  },
};

function setParam(k, v) {
  const p = new URLSearchParams(location.search);
  if (v === null || v === undefined || v === '') p.delete(k); else p.set(k, v);
  history.replaceState(null, '', location.pathname + (p.toString() ? '?' + p : ''));
}

let timer = null;
function schedule(run) {
  clearInterval(timer);
  const s = REFRESH[range.refresh] || 0;
  if (s) timer = setInterval(() => { if (!document.hidden) run(); }, s * 1000);
}

function rangePicker(run) {
  const sel = el('select', { id: 'range', 'aria-label': 'time range' },
    Object.keys(RANGES).map(k => el('option', { value: k, selected: k === range.name, text: 'last ' + k })));
  sel.addEventListener('change', () => { range.name = sel.value; range.end = null; range.changed(); });
  const now = el('button', { type: 'button', text: 'now', title: 'end the range now' });
  now.addEventListener('click', () => { range.end = null; if (range.refresh === 'off') range.refresh = '15s'; refresh.value = range.refresh; range.changed(); });
  const refresh = el('select', { id: 'refresh', 'aria-label': 'auto-refresh' },
    Object.keys(REFRESH).map(k => el('option', { value: k, selected: k === range.refresh, text: k === 'off' ? 'no refresh' : 'every ' + k })));
  refresh.addEventListener('change', () => { range.refresh = refresh.value; range.changed(); });
  const endNote = el('span', { class: 'dim' });
  range.listeners.push(() => {
    sel.value = range.name;
    refresh.value = range.refresh;
    endNote.textContent = range.end ? ' until ' + new Date(range.end).toLocaleString() : '';
    schedule(run);
    run();
  });
  endNote.textContent = range.end ? ' until ' + new Date(range.end).toLocaleString() : '';
  schedule(run);
  return el('div', { class: 'controls' }, sel, now, refresh, endNote);
}

async function queryRange(q, start, end, step) {
  const r = await api('/api/v1/query_range', { query: q, start: start / 1000, end: end / 1000, step });
  return r.data.result;
}

/// What happened in a range, for the charts' annotations.
async function annotations(start, end, service) {
  try {
    const r = await api('/ui/api/events', { start_ms: Math.floor(start), end_ms: Math.ceil(end), service, marks: 1 });
    return r.events;
  } catch {
    return [];
  }
}

/// A panel of charts over one range, each a PromQL query.
function chartPanel(parent, specs, service) {
  const grid = el('div', { class: 'charts' });
  parent.append(grid);
  const charts = specs.map(s => ({ s, c: new Chart(grid, { title: s.title, unit: s.unit ?? unitOf(s.q), stacked: s.stacked, onZoom: (a, b) => range.zoom(a, b) }) }));
  async function run() {
    const [start, end] = range.bounds();
    const step = range.step();
    const marks = await annotations(start, end, service);
    await Promise.all(charts.map(async ({ s, c }) => {
      try {
        const res = await queryRange(s.q, start, end, step);
        c.step = step * 1000;
        const series = fromMatrix(res).map(x => ({ ...x, name: s.legend ? s.legend(x.labels) : x.name }));
        c.set(series, start, end, marks);
        c.root.classList.toggle('empty', series.length === 0);
      } catch (e) {
        c.set([], start, end, marks);
        c.root.dataset.error = e.message;
      }
    }));
  }
  return run;
}

const svc = l => l.service || seriesName(l);

/// The share of 5xx responses, 0 (not absent) where there were none.
function errorRatio(sel, by) {
  const all = `sum by (${by}) (rate(http_requests_total{${sel}}[1m]))`;
  return `(sum by (${by}) (rate(http_requests_total{${sel},code=~"5.."}[1m])) or ${all} * 0) / ${all}`;
}
const PROXY = 'job="capstan"';

// ---------------------------------------------------------------- theme

function setupTheme() {
  const b = document.getElementById('theme');
  if (!b) return;
  const apply = t => {
    if (t) document.documentElement.dataset.theme = t; else delete document.documentElement.dataset.theme;
    b.textContent = (t || 'auto') + ' theme';
  };
  apply(localStorage.getItem('capstan-theme'));
  b.addEventListener('click', () => {
    const order = [null, 'dark', 'light'];
    const cur = localStorage.getItem('capstan-theme');
    const next = order[(order.indexOf(cur) + 1) % order.length];
    if (next) localStorage.setItem('capstan-theme', next); else localStorage.removeItem('capstan-theme');
    apply(next);
  });
}

/// The server-rendered part of a page, refreshed in place every 5 s.
function liveTables() {
  const parts = document.querySelectorAll('.live');
  if (!parts.length) return;
  setInterval(async () => {
    if (document.hidden) return;
    const u = new URL(location.href);
    u.searchParams.set('part', 'live');
    try {
      const r = await fetch(u, { credentials: 'same-origin' });
      if (!r.ok) return;
      const fresh = (await r.text()).split('<!--part-->');
      parts.forEach((p, i) => { if (fresh[i] !== undefined && p.innerHTML !== fresh[i]) p.innerHTML = fresh[i]; });
    } catch { /* the daemon restarts: try again next time */ }
  }, 5000);
}

/// Where a page's charts go: between the summary and the long tables.
function chartsBox() {
  return document.getElementById('charts') || main;
}

// ---------------------------------------------------------------- pages

function overview() {
  const box = el('section', { 'aria-label': 'charts' }, el('h2', { text: 'Over time' }));
  chartsBox().append(box);
  const run = chartPanel(box, [
    { title: 'Requests per second by service', q: `sum by (service) (rate(http_requests_total{${PROXY}}[1m]))`, unit: '', legend: svc, stacked: true },
    { title: 'Error ratio (5xx) by service', q: errorRatio(PROXY, 'service'), unit: 'percent', legend: svc },
    { title: 'p99 latency by service', q: `histogram_quantile(0.99, sum by (le, service) (rate(http_request_duration_seconds_bucket{${PROXY}}[1m])))`, unit: 'seconds', legend: svc },
    { title: 'CPU by replica', q: 'sum by (service, replica) (rate(container_cpu_usage_seconds_total[1m])) * 100', unit: '%', legend: l => `${l.service}-${l.replica}` },
    { title: 'Memory by replica', q: 'sum by (service, replica) (container_memory_working_set_bytes)', unit: 'bytes', legend: l => `${l.service}-${l.replica}` },
    { title: 'Host: CPU and memory in use', q: 'label_replace(1 - avg(rate(node_cpu_seconds_total{mode="idle"}[1m])), "what", "CPU", "", "") or label_replace(1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes, "what", "memory", "", "")', unit: 'percent', legend: l => l.what },
  ]);
  box.querySelector('h2').after(rangePicker(run));
  run();
}

function service() {
  const name = main.dataset.service;
  const sel = `${PROXY},service="${name}"`;
  const box = el('section', { 'aria-label': 'charts' }, el('h2', { text: 'Over time' }));
  chartsBox().append(box);
  const specs = [
    { title: 'Requests per second by revision', q: `sum by (revision) (rate(http_requests_total{${sel}}[1m]))`, unit: '', legend: l => 'revision ' + (l.revision || '?'), stacked: true },
    { title: 'Error ratio (5xx) by revision', q: errorRatio(sel, 'revision'), unit: 'percent', legend: l => 'revision ' + l.revision },
    { title: 'p99 latency by revision', q: `histogram_quantile(0.99, sum by (le, revision) (rate(http_request_duration_seconds_bucket{${sel}}[1m])))`, unit: 'seconds', legend: l => 'revision ' + l.revision },
    { title: 'CPU by replica', q: `sum by (replica, revision) (rate(container_cpu_usage_seconds_total{service="${name}"}[1m])) * 100`, unit: '%', legend: l => `${name}-${l.replica} (rev ${l.revision})` },
    { title: 'Memory by replica', q: `sum by (replica, revision) (container_memory_working_set_bytes{service="${name}"})`, unit: 'bytes', legend: l => `${name}-${l.replica} (rev ${l.revision})` },
  ];
  if (main.dataset.autoscale) {
    specs.push({ title: 'Autoscaler: each metric over its target (decisions marked)', q: `capstan_autoscaler_metric_ratio{service="${name}"}`, unit: '', legend: l => l.metric });
    specs.push({ title: 'Autoscaler: replicas', q: `label_replace(capstan_autoscaler_desired_replicas{service="${name}"}, "which", "desired", "", "") or label_replace(capstan_autoscaler_current_replicas{service="${name}"}, "which", "current", "", "")`, unit: '', legend: l => l.which });
  }
  const run = chartPanel(box, specs, name);
  box.querySelector('h2').after(rangePicker(run));
  run();
  const logs = el('section', { 'aria-label': 'logs' }, el('h2', { text: 'Logs' }));
  main.append(logs);
  const list = el('ol', { class: 'lines', id: 'service-logs' });
  logs.append(el('p', { class: 'dim', text: 'The newest lines of every replica, exited ones included; new lines appear as they are written.' }), list);
  const q = `{service="${name}"}`;
  const [start, end] = [Date.now() - 86400e3, Date.now()];
  api('/loki/api/v1/query_range', { query: q, limit: 100, direction: 'backward', start: start * 1e6, end: end * 1e6 })
    .then(r => {
      const rows = streamsToRows(r.data.result).reverse();
      rows.forEach(x => list.append(logLine(x)));
      tail(q, list, rows.length ? rows[rows.length - 1].ns + 1 : Date.now() * 1e6, 500, null);
    })
    .catch(e => problem(list, e));
}

function streamsToRows(result) {
  const rows = [];
  for (const s of result) for (const v of s.values) rows.push({ ns: +v[0], nsText: v[0], line: v[1], labels: s.stream, meta: v[2] });
  rows.sort((a, b) => b.ns - a.ns);
  return rows;
}

/// Labels Loki shows with a stream that are each line's own metadata.
const META = new Set(['trace_id', 'span_id', 'detected_level']);

const TRACE = /(?:trace_?id|traceID)["=:\s]+"?([0-9a-f]{32})\b/i;

function tsText(ns) {
  const d = new Date(ns / 1e6);
  return d.toLocaleTimeString([], { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
}

function logLine(r, onContext) {
  const who = r.labels.service ? `${r.labels.service}${r.labels.replica !== undefined ? '-' + r.labels.replica : ''}` : seriesName(r.labels);
  const trace = (r.meta && r.meta.trace_id) || r.labels.trace_id || (r.line.match(TRACE) || [])[1];
  const li = el('li', { 'data-ns': r.ns },
    el('time', { datetime: new Date(r.ns / 1e6).toISOString(), text: tsText(r.ns) }),
    el('span', { class: 'who', text: who }),
    el('span', { class: 'text', text: r.line }));
  if (trace) li.append(el('a', { class: 'trace', href: `/traces/${trace}`, text: 'trace' }));
  if (onContext) li.append(el('button', { type: 'button', class: 'link', text: 'context', onclick: () => onContext(r, li) }));
  return li;
}

/// Follows a LogQL query over Loki's tail WebSocket, newest lines last.
function tail(q, list, startNs, keep, button) {
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${proto}://${location.host}/loki/api/v1/tail?query=${encodeURIComponent(q)}&start=${startNs}&limit=100`);
  ws.onmessage = m => {
    const msg = JSON.parse(m.data);
    const rows = streamsToRows(msg.streams || []).reverse();
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    for (const r of rows) list.append(logLine(r));
    while (list.children.length > keep) list.firstChild.remove();
    if (atBottom) list.scrollTop = list.scrollHeight;
  };
  ws.onclose = () => { if (button) button.setAttribute('aria-pressed', 'false'); };
  return ws;
}

// ---------------------------------------------------------------- explore

/// A query box with completion of metric names, label names and values.
function promqlBox(initial) {
  const input = el('textarea', { id: 'query', rows: 2, spellcheck: 'false', autocomplete: 'off', role: 'combobox', 'aria-autocomplete': 'list', 'aria-expanded': 'false', 'aria-controls': 'suggestions', 'aria-label': 'PromQL query' });
  input.value = initial;
  const list = el('ul', { id: 'suggestions', role: 'listbox', class: 'suggest', hidden: true, 'aria-label': 'suggestions' });
  let names = null;
  const labelCache = new Map();
  let items = [], active = -1, token = null;
  async function metricNames() {
    if (!names) names = (await api('/api/v1/label/__name__/values')).data;
    return names;
  }
  async function cached(key, f) {
    if (!labelCache.has(key)) labelCache.set(key, f().catch(() => []));
    return labelCache.get(key);
  }
  function context() {
    const text = input.value.slice(0, input.selectionStart);
    const open = text.lastIndexOf('{'), close = text.lastIndexOf('}');
    if (open > close) {
      const metric = (text.slice(0, open).match(/([a-zA-Z_:][a-zA-Z0-9_:]*)\s*$/) || [])[1];
      const inside = text.slice(open + 1);
      const val = inside.match(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)$/);
      if (val) return { kind: 'value', label: val[1], metric, word: val[3] };
      const lab = inside.match(/(?:^|[,\s])([a-zA-Z_][a-zA-Z0-9_]*)?$/);
      if (lab) return { kind: 'label', metric, word: lab[1] || '' };
      return null;
    }
    const w = text.match(/([a-zA-Z_:][a-zA-Z0-9_:]*)$/);
    return w ? { kind: 'metric', word: w[1] } : null;
  }
  async function update() {
    const c = context();
    token = c;
    if (!c) return close();
    let pool = [];
    const match = c.metric ? [c.metric] : undefined;
    if (c.kind === 'metric') pool = await metricNames();
    else if (c.kind === 'label') pool = await cached('l' + c.metric, async () => (await api('/api/v1/labels', { 'match[]': match })).data.filter(n => n !== '__name__'));
    else pool = await cached(`v${c.metric}/${c.label}`, async () => (await api(`/api/v1/label/${encodeURIComponent(c.label)}/values`, { 'match[]': match })).data);
    if (token !== c) return;
    const w = c.word.toLowerCase();
    items = pool.filter(n => n.toLowerCase().includes(w) && n !== c.word)
      .sort((a, b) => (b.toLowerCase().startsWith(w) - a.toLowerCase().startsWith(w)) || a.localeCompare(b)).slice(0, 50);
    if (!items.length || (c.kind === 'metric' && !w)) return close();
    active = 0;
    render();
  }
  function render() {
    list.replaceChildren(...items.map((n, i) => el('li', { role: 'option', id: 'opt-' + i, 'aria-selected': String(i === active), text: n, onmousedown: e => { e.preventDefault(); accept(i); } })));
    list.hidden = false;
    input.setAttribute('aria-expanded', 'true');
    input.setAttribute('aria-activedescendant', 'opt-' + active);
  }
  function close() {
    items = [];
    list.hidden = true;
    input.setAttribute('aria-expanded', 'false');
    input.removeAttribute('aria-activedescendant');
  }
  function accept(i) {
    const c = token, pick = items[i];
    if (!c || pick === undefined) return;
    const pos = input.selectionStart;
    const before = input.value.slice(0, pos - c.word.length), after = input.value.slice(pos);
    input.value = before + pick + after;
    const at = before.length + pick.length;
    input.setSelectionRange(at, at);
    close();
    input.focus();
  }
  input.addEventListener('input', () => update().catch(close));
  input.addEventListener('blur', () => setTimeout(close, 100));
  input.addEventListener('keydown', e => {
    if (!list.hidden && items.length) {
      if (e.key === 'ArrowDown') { active = (active + 1) % items.length; render(); e.preventDefault(); return; }
      if (e.key === 'ArrowUp') { active = (active + items.length - 1) % items.length; render(); e.preventDefault(); return; }
      if (e.key === 'Tab' || (e.key === 'Enter' && !e.ctrlKey)) { accept(active); e.preventDefault(); return; }
      if (e.key === 'Escape') { close(); e.preventDefault(); return; }
    }
  });
  return { input, list };
}

function explore() {
  const { input, list } = promqlBox(params.get('q') || '');
  const run = el('button', { type: 'submit', text: 'Run' });
  const tabs = { graph: null, table: null };
  let tab = params.get('tab') === 'table' ? 'table' : 'graph';
  const graphBtn = el('button', { type: 'button', role: 'tab', id: 'tab-graph', text: 'Graph' });
  const tableBtn = el('button', { type: 'button', role: 'tab', id: 'tab-table', text: 'Table' });
  const stacked = el('input', { type: 'checkbox', id: 'stacked', checked: params.get('stacked') === '1' });
  const heat = el('input', { type: 'checkbox', id: 'heatmap', checked: params.get('heatmap') === '1' });
  const status = el('p', { id: 'status', class: 'dim', role: 'status' });
  const out = el('div', { id: 'result' });
  const form = el('form', { class: 'query', role: 'search' },
    el('label', { for: 'query', text: 'PromQL' }), el('div', { class: 'combo' }, input, list), run);
  main.append(el('h2', { text: 'Explore metrics' }), form);
  let chart = null;
  async function execute() {
    const q = input.value.trim();
    setParam('q', q);
    setParam('tab', tab === 'table' ? 'table' : null);
    graphBtn.setAttribute('aria-selected', String(tab === 'graph'));
    tableBtn.setAttribute('aria-selected', String(tab === 'table'));
    if (!q) { out.replaceChildren(); status.textContent = 'Type a query; names and labels complete as you type (Tab or Enter accepts).'; return; }
    const [start, end] = range.bounds();
    const t0 = performance.now();
    try {
      if (tab === 'graph') {
        const step = range.step();
        const res = await queryRange(q, start, end, step);
        const series = fromMatrix(res);
        const buckets = series.length > 1 && series.every(s => s.labels.le !== undefined);
        heat.disabled = !buckets;
        if (chart) chart.destroy();
        out.replaceChildren();
        chart = new Chart(out, { unit: await unitFor(q, series), stacked: stacked.checked, heatmap: buckets && heat.checked, height: 320, onZoom: (a, b) => range.zoom(a, b) });
        chart.step = step * 1000;
        const draw = chart.set(series, start, end, await annotations(start, end));
        performance.measure('capstan-chart', { start: t0, duration: performance.now() - t0 });
        window.capstanChartDrawMs = draw;
        status.textContent = `${series.length} series, ${series.reduce((n, s) => n + s.points.length, 0)} points, step ${step}s; drawn in ${draw.toFixed(1)} ms`;
        status.dataset.series = series.length;
      } else {
        const r = await api('/api/v1/query', { query: q, time: end / 1000 });
        out.replaceChildren(resultTable(r.data, unitOf(q)));
        const n = Array.isArray(r.data.result) ? r.data.result.length : 1;
        status.textContent = `${n} result${n === 1 ? '' : 's'} at ${new Date(end).toLocaleString()}`;
        status.dataset.series = n;
      }
      status.className = 'dim';
    } catch (e) {
      status.textContent = e.message;
      status.className = 'bad';
      status.dataset.series = '';
      out.replaceChildren();
    }
  }
  graphBtn.onclick = () => { tab = 'graph'; execute(); };
  tableBtn.onclick = () => { tab = 'table'; execute(); };
  stacked.onchange = () => { setParam('stacked', stacked.checked ? '1' : null); execute(); };
  heat.onchange = () => { setParam('heatmap', heat.checked ? '1' : null); execute(); };
  form.addEventListener('submit', e => { e.preventDefault(); execute(); });
  input.addEventListener('keydown', e => {
    if (e.key === 'Enter' && !e.shiftKey && !e.defaultPrevented) { e.preventDefault(); execute(); }
  });
  main.append(el('div', { class: 'controls' },
    el('span', { role: 'tablist', 'aria-label': 'view' }, graphBtn, tableBtn), rangePicker(execute),
    el('label', {}, stacked, ' stacked'), el('label', {}, heat, ' heatmap (histogram buckets)')), status, out);
  execute();
}

/// The unit of a query's result: from the metric's name, else from its
/// metadata (`unit`, as OpenMetrics exposes it).
async function unitFor(q, series) {
  const name = series[0]?.labels.__name__;
  const byName = unitOf(q + ' ' + (name || ''));
  if (byName) return byName;
  const selector = name || (q.match(/[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{[]|\s*$)/) || [])[0];
  if (!selector) return '';
  try {
    const m = await api('/api/v1/metadata', { metric: selector, limit: 1 });
    const unit = (m.data[selector] || [])[0]?.unit;
    return { bytes: 'bytes', seconds: 'seconds', ratio: 'percent' }[unit] || '';
  } catch {
    return '';
  }
}

function resultTable(data, unit) {
  const t = el('table', {}, el('thead', {}, el('tr', {}, el('th', { text: 'series' }), el('th', { text: 'value' }))));
  const body = el('tbody');
  const rows = data.resultType === 'vector' ? data.result.map(r => [seriesName(r.metric), r.value[1]])
    : data.resultType === 'matrix' ? data.result.map(r => [seriesName(r.metric), r.values.map(v => v[1]).join(', ')])
      : [[data.resultType, data.result[1]]];
  for (const [name, v] of rows) {
    const n = parseFloat(v);
    body.append(el('tr', {}, el('td', { text: name }), el('td', { text: Number.isNaN(n) || String(v).includes(',') ? String(v) : `${v} (${formatValue(n, unit)})` })));
  }
  t.append(body);
  return t;
}

// ---------------------------------------------------------------- logs

function logs() {
  const input = el('input', { id: 'logql', type: 'text', spellcheck: 'false', 'aria-label': 'LogQL query', value: params.get('q') || '{service=~".+"}' });
  const live = el('button', { type: 'button', id: 'live-tail', 'aria-pressed': 'false', text: 'Live tail' });
  const form = el('form', { class: 'query', role: 'search' }, el('label', { for: 'logql', text: 'LogQL' }), input, el('button', { type: 'submit', text: 'Run' }), live);
  const status = el('p', { id: 'status', class: 'dim', role: 'status' });
  const histo = el('div', { id: 'histogram' });
  const list = el('ol', { class: 'lines', id: 'log-lines' });
  main.append(el('h2', { text: 'Logs' }), form);
  let chart = null, socket = null;
  async function context(r, li) {
    const next = li.nextElementSibling;
    if (next && next.classList.contains('context')) { next.remove(); return; }
    // The line's stream (its per-line metadata, such as trace ids, left out).
    const sel = '{' + Object.entries(r.labels).filter(([k]) => !META.has(k)).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(', ') + '}';
    const at = BigInt(r.nsText), hour = 3600000000000n;
    const [before, after] = await Promise.all([
      api('/loki/api/v1/query_range', { query: sel, limit: 10, direction: 'backward', start: String(at - hour), end: String(at) }),
      api('/loki/api/v1/query_range', { query: sel, limit: 11, direction: 'forward', start: String(at), end: String(at + hour) }),
    ]);
    const rows = [...streamsToRows(before.data.result).reverse(), ...streamsToRows(after.data.result).reverse()];
    const box = el('li', { class: 'context' }, el('ol', { class: 'lines' }, rows.map(x => {
      const l = logLine(x);
      if (x.nsText === r.nsText && x.line === r.line) l.classList.add('hit');
      return l;
    })));
    li.after(box);
  }
  async function execute() {
    const q = input.value.trim();
    setParam('q', q);
    const [start, end] = range.bounds();
    const step = range.step();
    try {
      const [lines, counts] = await Promise.all([
        api('/loki/api/v1/query_range', { query: q, limit: 500, direction: 'backward', start: start * 1e6, end: end * 1e6 }),
        api('/loki/api/v1/query_range', { query: `sum(count_over_time(${q} [${step}s]))`, start: start * 1e6, end: end * 1e6, step }).catch(() => null),
      ]);
      if (lines.data.resultType !== 'streams') {
        status.textContent = 'This is a metric query: see it over time below.';
        list.replaceChildren();
        if (!chart) chart = new Chart(histo, { title: 'Result', onZoom: (a, b) => range.zoom(a, b) });
        chart.set(fromMatrix(lines.data.result), start, end);
        return;
      }
      const rows = streamsToRows(lines.data.result);
      list.replaceChildren(...rows.map(r => logLine(r, context)));
      status.textContent = `${rows.length}${rows.length === 500 ? '+' : ''} lines, newest first`;
      status.className = 'dim';
      status.dataset.lines = rows.length;
      if (!chart) chart = new Chart(histo, { title: 'Matching lines over time', bars: true, stacked: true, height: 120, onZoom: (a, b) => range.zoom(a, b) });
      chart.step = step * 1000;
      const series = counts ? fromMatrix(counts.data.result).map(s => ({ ...s, name: 'lines per ' + step + 's' })) : [];
      chart.set(series, start, end, await annotations(start, end));
    } catch (e) {
      status.textContent = e.message;
      status.className = 'bad';
      status.dataset.lines = '';
      list.replaceChildren();
    }
  }
  live.addEventListener('click', () => {
    if (socket) {
      socket.close();
      socket = null;
      live.setAttribute('aria-pressed', 'false');
      return;
    }
    live.setAttribute('aria-pressed', 'true');
    list.replaceChildren();
    status.textContent = 'Following new lines (oldest at the top)…';
    socket = tail(input.value.trim(), list, Date.now() * 1e6, 1000, live);
  });
  form.addEventListener('submit', e => { e.preventDefault(); if (socket) live.click(); execute(); });
  main.append(el('div', { class: 'controls' }, rangePicker(execute)), status, histo, list);
  execute();
}

// ---------------------------------------------------------------- traces

function traces() {
  const id = main.dataset.trace;
  if (id) return waterfall(id);
  const f = (name, label, attrs = {}) => el('label', {}, label + ' ', el('input', { name, id: 'f-' + name, value: params.get(name) || '', ...attrs }));
  const service = el('select', { name: 'service', id: 'f-service' }, el('option', { value: '', text: 'any' }));
  const status = el('select', { name: 'status', id: 'f-status' }, ['', 'error', 'ok', 'unset'].map(s => el('option', { value: s, text: s || 'any', selected: params.get('status') === s })));
  const form = el('form', { class: 'query', role: 'search' },
    el('label', {}, 'service ', service), f('minDuration', 'min duration', { placeholder: '100ms', size: 7 }),
    el('label', {}, 'status ', status), f('q', 'TraceQL', { placeholder: '{ span.http.status_code >= 500 }', size: 40 }),
    el('button', { type: 'submit', text: 'Search' }));
  const out = el('div', { id: 'result' });
  const note = el('p', { id: 'status', class: 'dim', role: 'status' });
  main.append(el('h2', { text: 'Traces' }), form);
  api('/api/search/tag/service.name/values').then(r => {
    for (const v of r.tagValues || []) service.append(el('option', { value: v, text: v, selected: params.get('service') === v }));
  }).catch(() => {});
  async function execute() {
    const [start, end] = range.bounds();
    const q = {};
    for (const [k, v] of new FormData(form)) { q[k] = v; setParam(k, v); }
    try {
      const r = await api('/api/search', { ...q, start: Math.floor(start / 1000), end: Math.ceil(end / 1000), limit: 50 });
      const rows = r.traces || [];
      note.textContent = `${rows.length} traces`;
      note.className = 'dim';
      out.replaceChildren(el('table', {}, el('thead', {}, el('tr', {}, ['trace', 'root', 'started', 'duration', 'spans', 'errors'].map(h => el('th', { text: h })))),
        el('tbody', {}, rows.map(t => el('tr', {},
          el('td', {}, el('a', { href: '/traces/' + t.traceID, text: t.traceID.slice(0, 16) })),
          el('td', { text: `${t.rootServiceName}: ${t.rootTraceName}` }),
          el('td', { text: new Date(+t.startTimeUnixNano / 1e6).toLocaleTimeString() }),
          el('td', { text: t.durationMs ? formatValue(t.durationMs / 1000, 'seconds') : '< 1 ms' }),
          el('td', { text: t.spanCount ?? '' }),
          el('td', { class: t.errorCount ? 'bad' : '', text: t.errorCount ?? 0 }))))));
    } catch (e) {
      note.textContent = e.message;
      note.className = 'bad';
    }
  }
  form.addEventListener('submit', e => { e.preventDefault(); execute(); });
  main.append(el('div', { class: 'controls' }, rangePicker(execute)), note, out);
  execute();
}

const SPAN_KINDS = ['unspecified', 'internal', 'server', 'client', 'producer', 'consumer'];
const STATUS_CODES = ['unset', 'ok', 'error'];

function attrValue(v) {
  if (!v) return '';
  for (const k of ['stringValue', 'intValue', 'doubleValue', 'boolValue']) if (v[k] !== undefined) return String(v[k]);
  if (v.arrayValue) return (v.arrayValue.values || []).map(attrValue).join(', ');
  return JSON.stringify(v);
}

function hexId(x) {
  if (!x) return '';
  if (/^[0-9a-f]+$/i.test(x)) return x.toLowerCase();
  try { return [...atob(x)].map(c => c.charCodeAt(0).toString(16).padStart(2, '0')).join(''); } catch { return x; }
}

async function waterfall(id) {
  main.append(el('h2', {}, 'Trace ', el('code', { text: id })));
  const box = el('div', { id: 'waterfall', role: 'tree', 'aria-label': 'spans' });
  const detail = el('section', { id: 'span-detail', 'aria-live': 'polite' });
  main.append(box, detail);
  let data, logsOf;
  try {
    [data, logsOf] = await Promise.all([api('/api/traces/' + id), api(`/api/traces/${id}/logs`).catch(() => ({ logs: [] }))]);
  } catch (e) {
    return problem(box, e);
  }
  const spans = [];
  for (const b of data.batches || []) {
    const res = Object.fromEntries((b.resource?.attributes || []).map(a => [a.key, attrValue(a.value)]));
    for (const ss of b.scopeSpans || b.instrumentationLibrarySpans || []) {
      for (const s of ss.spans || []) {
        spans.push({ ...s, id: hexId(s.spanId), parent: hexId(s.parentSpanId), service: res['service.name'] || '?', resource: res, start: +s.startTimeUnixNano, end: +s.endTimeUnixNano });
      }
    }
  }
  if (!spans.length) return problem(box, 'no spans in this trace');
  const t0 = Math.min(...spans.map(s => s.start)), t1 = Math.max(...spans.map(s => s.end));
  const total = Math.max(1, t1 - t0);
  const byId = new Map(spans.map(s => [s.id, s]));
  const kids = new Map();
  for (const s of spans) {
    const p = byId.has(s.parent) ? s.parent : '';
    if (!kids.has(p)) kids.set(p, []);
    kids.get(p).push(s);
  }
  const ordered = [];
  const walk = (p, depth) => (kids.get(p) || []).sort((a, b) => a.start - b.start).forEach(s => { ordered.push([s, depth]); walk(s.id, depth + 1); });
  walk('', 0);
  const lines = logsOf.logs || [];
  box.append(el('p', { class: 'dim', text: `${spans.length} spans, ${formatValue(total / 1e9, 'seconds')}, ${new Set(spans.map(s => s.service)).size} services` }));
  for (const [s, depth] of ordered) {
    const err = s.status && (s.status.code === 2 || s.status.code === 'STATUS_CODE_ERROR');
    const row = el('button', { type: 'button', class: 'span' + (err ? ' err' : ''), role: 'treeitem', 'aria-level': depth + 1, 'data-span': s.id },
      el('span', { class: 'name', style: `padding-left:${depth * 14}px`, text: `${s.service}: ${s.name}` }),
      el('span', { class: 'track' }, el('span', { class: 'bar', style: `left:${((s.start - t0) / total) * 100}%;width:${Math.max(0.3, ((s.end - s.start) / total) * 100)}%` })),
      el('span', { class: 'dur', text: formatValue((s.end - s.start) / 1e9, 'seconds') }));
    row.addEventListener('click', () => showSpan(s, lines, detail));
    box.append(row);
  }
  showSpan(ordered[0][0], lines, detail);
}

function showSpan(s, lines, detail) {
  const attrs = (s.attributes || []).map(a => [a.key, attrValue(a.value)]);
  const own = lines.filter(l => !l.span_id || hexId(l.span_id) === s.id);
  detail.replaceChildren(el('h3', { text: `${s.service}: ${s.name}` }),
    el('table', { class: 'attrs' }, el('tbody', {},
      [['span id', s.id], ['duration', formatValue((s.end - s.start) / 1e9, 'seconds')], ['kind', SPAN_KINDS[s.kind] ?? String(s.kind ?? '')], ['status', s.status ? [STATUS_CODES[s.status.code ?? 0] ?? String(s.status.code), s.status.message].filter(Boolean).join(': ') : 'unset'], ...attrs,
        ...Object.entries(s.resource).map(([k, v]) => ['resource ' + k, v])]
        .map(([k, v]) => el('tr', {}, el('th', { text: k }), el('td', { text: v }))))),
    el('h3', { text: 'Log lines of this span' }),
    own.length ? el('ol', { class: 'lines', id: 'trace-logs' }, own.map(l => logLine({ ns: +l.ts_ns, line: l.line, labels: l.labels || {} })))
      : el('p', { class: 'dim', text: 'none' }));
}

// ---------------------------------------------------------------- alerts

async function alerts() {
  const box = el('section', { 'aria-label': 'alert history' }, el('h2', { text: 'History' }));
  const list = el('ol', { class: 'lines', id: 'alert-history' });
  box.append(list);
  main.append(box);
  const end = Date.now();
  try {
    const r = await api('/loki/api/v1/query_range', { query: '{service="capstan", stream="alerts"}', limit: 200, direction: 'backward', start: (end - 7 * 86400e3) * 1e6, end: end * 1e6 });
    const rows = streamsToRows(r.data.result);
    if (!rows.length) list.append(el('li', { class: 'dim', text: 'no transitions recorded yet' }));
    for (const x of rows) {
      let text = x.line;
      try {
        const a = JSON.parse(x.line);
        text = `${a.labels?.alertname ?? ''} ${a.state ?? ''} ${Object.entries(a.labels || {}).filter(([k]) => k !== 'alertname').map(([k, v]) => `${k}=${v}`).join(' ')} ${a.annotations?.summary ?? ''}`;
      } catch { /* a plain line */ }
      list.append(logLine({ ...x, line: text }));
    }
  } catch (e) {
    problem(list, e);
  }
}

// ---------------------------------------------------------------- start

setupTheme();
liveTables();
const pages = { overview, service, explore, logs, traces, alerts };
(pages[page] || (() => {}))();
