"""The web chat page: one self-contained HTML file (no CDN, no build step) that talks to /v1.

Why not Gradio: this page works offline (Gradio pulls fonts/assets from the internet and a
tunnel for ``--share``), adds no 100+ MB dependency, loads instantly, is protected by the same
``--api-key`` as the API because it *uses* the API, and its streaming is the API's streaming —
so what the browser test checks is what API clients get.
"""

from __future__ import annotations

import html
import json

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>qvl · __TITLE__</title>
<style>
:root{--bg:#f6f7f9;--fg:#1d2228;--mut:#6b7480;--acc:#3558d6;--card:#fff;--bd:#dde1e6}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{padding:10px 18px;border-bottom:1px solid var(--bd);background:var(--card);display:flex;gap:12px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{color:var(--mut);font-size:13px}
main{display:flex;gap:14px;padding:14px;height:calc(100vh - 50px)}
#chatcol{flex:1;display:flex;flex-direction:column;min-width:0}
#chat{flex:1;overflow:auto;background:var(--card);border:1px solid var(--bd);border-radius:8px;padding:12px}
.msg{margin:8px 0;padding:8px 12px;border-radius:8px;max-width:90%;white-space:pre-wrap;word-wrap:break-word}
.msg.user{background:#e7edff;margin-left:auto}.msg.assistant{background:#f1f2f4}
.msg img.thumb,.msg video.thumb{max-height:140px;max-width:220px;border-radius:6px;display:block;margin:4px 0}
details.reasoning{color:var(--mut);border-left:3px solid var(--bd);padding-left:8px;margin-bottom:6px}
details.reasoning summary{cursor:pointer;font-size:13px}
.boxes canvas{max-width:100%;border-radius:6px;margin-top:6px;display:block}
#composer{display:flex;gap:8px;margin-top:10px;align-items:flex-end}
#prompt{flex:1;min-height:54px;padding:8px;border:1px solid var(--bd);border-radius:8px;font:inherit;resize:vertical}
button{padding:8px 12px;border-radius:8px;border:1px solid var(--bd);background:var(--card);cursor:pointer;font:inherit}
button.primary{background:var(--acc);color:#fff;border-color:var(--acc)}button:disabled{opacity:.5;cursor:default}
#attach{display:flex;gap:6px;flex-wrap:wrap;margin-top:6px}#attach .chip{font-size:12px;background:#eef;padding:2px 8px;border-radius:10px}
aside{width:270px;background:var(--card);border:1px solid var(--bd);border-radius:8px;padding:12px;overflow:auto}
aside label{display:block;font-size:13px;margin-top:10px;color:var(--mut)}aside input,aside textarea{width:100%;font:inherit;padding:4px}
#status{font-size:12px;color:var(--mut);margin-top:4px;min-height:16px}
.err{color:#b00020}
</style></head><body>
<header><h1>__TITLE__</h1><span id="info">backend __BACKEND__</span></header>
<main><div id="chatcol">
<div id="chat" aria-live="polite"></div>
<div id="attach"></div>
<div id="composer">
<label><input id="file" type="file" accept="image/*,video/*" multiple hidden><button type="button" onclick="document.getElementById('file').click()">📁 Upload</button></label>
<textarea id="prompt" placeholder="Ask about an image or video… (Enter to send, Shift+Enter for a new line)"></textarea>
<div style="display:flex;flex-direction:column;gap:4px">
<button id="send" class="primary">Send</button><button id="stop" disabled>Stop</button></div>
<div style="display:flex;flex-direction:column;gap:4px"><button id="regen">Regenerate</button><button id="clear">Clear</button></div>
</div><div id="status"></div></div>
<aside>
<b>Settings</b>
<label>System prompt<textarea id="system" rows="3"></textarea></label>
<label>Temperature <input id="temperature" type="number" step="0.05" min="0" max="2"></label>
<label>top_p <input id="top_p" type="number" step="0.05" min="0.01" max="1"></label>
<label>top_k <input id="top_k" type="number" step="1" min="-1"></label>
<label>Presence penalty <input id="presence_penalty" type="number" step="0.1" min="-2" max="2"></label>
<label>Max new tokens <input id="max_tokens" type="number" step="1" min="1"></label>
<label id="keyrow" __KEYSTYLE__>API key <input id="apikey" type="password" autocomplete="off"></label>
<p style="font-size:12px;color:var(--mut)">Boxes in <code>bbox_2d</code> answers are drawn on the image. Reasoning (&lt;think&gt;) is folded.</p>
</aside></main>
<script>
const MODEL = __MODEL__;
const $ = id => document.getElementById(id);
let history = [];      // OpenAI messages sent so far (user/assistant)
let pending = [];      // {kind, url, name} attached to the next user turn
let controller = null, lastImage = null;
const params = new URLSearchParams(location.search);
if (params.get('key')) sessionStorage.setItem('qvl-key', params.get('key'));
$('apikey').value = sessionStorage.getItem('qvl-key') || '';
$('apikey').onchange = () => sessionStorage.setItem('qvl-key', $('apikey').value);
function headers(){ const h = {'Content-Type':'application/json'}; const k = $('apikey').value; if (k) h['Authorization'] = 'Bearer ' + k; return h; }
function status(t, err){ $('status').textContent = t; $('status').className = err ? 'err' : ''; }

async function loadConfig(){
  const r = await fetch('ui/config', {headers: headers()});
  if (r.status === 401){ $('keyrow').style.display = ''; status('enter the API key (settings)', true); return; }
  const c = await r.json();
  for (const k of ['temperature','top_p','top_k','presence_penalty','max_tokens']) $(k).value = c.sampling[k];
  $('info').textContent = `${c.model} · backend ${c.backend} · context ${c.max_model_len} tokens` + (c.thinking ? ' · Thinking' : '');
}
loadConfig();

$('file').onchange = async ev => {
  for (const f of ev.target.files){
    const kind = f.type.startsWith('video') || /\.(mp4|avi|mkv|mov|wmv|flv|webm|mpeg)$/i.test(f.name) ? 'video' : 'image';
    const url = await new Promise((ok, no) => { const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = no; r.readAsDataURL(f); });
    pending.push({kind, url, name: f.name});
  }
  ev.target.value = ''; drawAttach();
};
function drawAttach(){ $('attach').innerHTML = ''; for (const p of pending){ const s = document.createElement('span'); s.className = 'chip'; s.textContent = (p.kind === 'video' ? '🎞 ' : '🖼 ') + p.name; $('attach').appendChild(s);} }

function bubble(role){ const d = document.createElement('div'); d.className = 'msg ' + role; $('chat').appendChild(d); $('chat').scrollTop = 1e9; return d; }
function showUser(content){
  const d = bubble('user');
  for (const part of content){
    if (part.type === 'text'){ const t = document.createElement('div'); t.textContent = part.text; d.appendChild(t); }
    else if (part.type === 'image_url'){ const i = document.createElement('img'); i.className = 'thumb'; i.src = part.image_url.url; d.appendChild(i); }
    else if (part.type === 'video_url'){ const v = document.createElement('video'); v.className = 'thumb'; v.src = part.video_url.url; v.controls = true; d.appendChild(v); }
  }
}
function splitThink(text){
  // Thinking models: "<think>reasoning</think>answer"; the opening tag may come from the prompt.
  const end = text.indexOf('</think>');
  const start = text.indexOf('<think>');
  if (end >= 0) return {reasoning: text.slice(start >= 0 ? start + 7 : 0, end).trim(), answer: text.slice(end + 8).replace(/^\s+/, ''), open: false};
  if (start >= 0) return {reasoning: text.slice(start + 7).trim(), answer: '', open: true};
  return {reasoning: null, answer: text, open: false};
}
function render(d, text){
  const s = splitThink(text);
  let det = d.querySelector('details.reasoning'), ans = d.querySelector('.answer');
  if (s.reasoning !== null && !det){ det = document.createElement('details'); det.className = 'reasoning'; det.innerHTML = '<summary>Reasoning</summary><div class="rtext"></div>'; d.prepend(det); }
  if (det){ det.querySelector('.rtext').textContent = s.reasoning; det.open = s.open; }
  if (!ans){ ans = document.createElement('div'); ans.className = 'answer'; d.appendChild(ans); }
  ans.textContent = s.answer;
  $('chat').scrollTop = 1e9;
}
async function drawBoxes(d, text){
  if (!lastImage || !/bbox_2d|point_2d/.test(text)) return;
  const img = new Image(); img.src = lastImage; await img.decode();
  const r = await fetch('ui/grounding', {method: 'POST', headers: headers(), body: JSON.stringify({text, width: img.naturalWidth, height: img.naturalHeight})});
  if (!r.ok) return;
  const items = (await r.json()).items; if (!items.length) return;
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const lw = Math.max(2, Math.round(Math.max(c.width, c.height) / 300)); g.lineWidth = lw; g.font = `${6 * lw + 6}px sans-serif`;
  items.forEach((it, i) => {
    const col = `hsl(${(i * 67) % 360} 85% 45%)`; g.strokeStyle = col; g.fillStyle = col;
    if (it.bbox){ const [x1, y1, x2, y2] = it.bbox; g.strokeRect(x1, y1, x2 - x1, y2 - y1); if (it.label) g.fillText(it.label, x1 + lw, Math.max(y1 - lw, 6 * lw + 6)); }
    else if (it.point){ const [x, y] = it.point; g.beginPath(); g.arc(x, y, 3 * lw, 0, 7); g.fill(); if (it.label) g.fillText(it.label, x + 4 * lw, y); }
  });
  const wrap = document.createElement('div'); wrap.className = 'boxes'; wrap.appendChild(c); d.appendChild(wrap);
}
function messagesForApi(){
  const msgs = [];
  const sys = $('system').value.trim(); if (sys) msgs.push({role: 'system', content: sys});
  for (const m of history){
    // earlier reasoning is not sent back (the Qwen3 templates drop it too)
    msgs.push(m.role === 'assistant' ? {role: 'assistant', content: splitThink(m.content).answer} : m);
  }
  return msgs;
}
function num(id){ const v = $(id).value; return v === '' ? undefined : Number(v); }
function busy(b){ $('send').disabled = b; $('regen').disabled = b; $('stop').disabled = !b; }

async function generate(){
  const d = bubble('assistant'); d.dataset.state = 'streaming';
  busy(true); status('generating…'); controller = new AbortController();
  let text = '';
  const body = {model: MODEL, messages: messagesForApi(), stream: true, stream_options: {include_usage: true},
                temperature: num('temperature'), top_p: num('top_p'), top_k: num('top_k'),
                presence_penalty: num('presence_penalty'), max_tokens: num('max_tokens')};
  try {
    const r = await fetch('v1/chat/completions', {method: 'POST', headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok){ const e = await r.json().catch(() => ({error: {message: r.statusText}})); throw new Error(e.error.message); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '', usage = null;
    for (;;){
      const {done, value} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i; while ((i = buf.indexOf('\n\n')) >= 0){
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith('data:')) continue; const data = line.slice(5).trim(); if (data === '[DONE]') continue;
        const ev = JSON.parse(data); if (ev.error) throw new Error(ev.error.message);
        if (ev.usage) usage = ev.usage;
        for (const ch of ev.choices || []) if (ch.delta && ch.delta.content){ text += ch.delta.content; render(d, text); }
      }
    }
    status(usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : 'done');
  } catch (e) {
    if (e.name === 'AbortError') status('stopped'); else { status(e.message, true); if (!text) d.remove(); }
  } finally {
    render(d, text); d.dataset.state = 'done'; busy(false); controller = null;
    if (text) { history.push({role: 'assistant', content: text}); await drawBoxes(d, text); }
  }
}
async function send(){
  const t = $('prompt').value.trim(); if (!t && !pending.length) return;
  const content = pending.map(p => p.kind === 'image' ? {type: 'image_url', image_url: {url: p.url}} : {type: 'video_url', video_url: {url: p.url}});
  for (const p of pending) if (p.kind === 'image') lastImage = p.url;
  if (t) content.push({type: 'text', text: t});
  history.push({role: 'user', content}); showUser(content);
  pending = []; drawAttach(); $('prompt').value = '';
  await generate();
}
$('send').onclick = send;
$('prompt').addEventListener('keydown', e => { if (e.key === 'Enter' && !e.shiftKey){ e.preventDefault(); send(); } });
$('stop').onclick = () => controller && controller.abort();
$('regen').onclick = async () => {
  if (!history.length) return;
  if (history[history.length - 1].role === 'assistant'){ history.pop(); const last = [...document.querySelectorAll('.msg.assistant')].pop(); if (last) last.remove(); }
  if (history.length && history[history.length - 1].role === 'user') await generate();
};
$('clear').onclick = () => { if (controller) controller.abort(); history = []; pending = []; lastImage = null; $('chat').innerHTML = ''; drawAttach(); status('cleared'); };
</script></body></html>
"""


def page(model: str, backend: str, needs_key: bool) -> str:
    return (_PAGE.replace("__TITLE__", html.escape(model))
            .replace("__BACKEND__", html.escape(backend))
            .replace("__MODEL__", json.dumps(model).replace("</", "<\\/"))
            .replace("__KEYSTYLE__", "" if needs_key else 'style="display:none"'))
