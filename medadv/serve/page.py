"""The web page at ``/``: upload an image, see its provenance, screening and diagnosis beside it (for a
multi-label reader, a table of every finding's probability, threshold and decision); readers see past
analyses and download receipts. The page holds no data: its script calls the ``/v1`` API with the
token typed into it (kept in the tab's sessionStorage only). ``/#token=T&analysis=ID`` shows one analysis.

The template lives here as a string (Jinja2, autoescaped), so it ships with the Python package.
"""

from __future__ import annotations

from typing import Any

from jinja2 import DictLoader, Environment, select_autoescape

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medadv analysis service</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222;background:#fafafa}
 h1{font-size:1.5em;margin-bottom:.2em} .sub{color:#666;margin-top:0}
 section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0}
 .row{display:flex;gap:2em;align-items:flex-start} #preview{width:280px;height:280px;object-fit:contain;
 background:#111;border-radius:4px;image-rendering:pixelated}
 .badge{display:inline-block;padding:.2em .6em;border-radius:4px;font-weight:600;color:#fff}
 .verified{background:#2e7d32}.modified{background:#c62828}.unknown-device{background:#ef6c00}.unsigned{background:#757575}
 .flagged{background:#c62828}.clear{background:#2e7d32}.positive{background:#ad1457}.negative{background:#1565c0}
 .withheld{background:#555} table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #eee;padding:.3em;text-align:left;font-size:.9em}
 code{font-size:.85em;word-break:break-all} #error{color:#c62828;font-weight:600}
</style></head>
<body>
<h1>medadv analysis service</h1>
<p class="sub">Task <b>{{ info.task }}</b> &middot; model {{ info.arch }} &middot; {% if info.thresholds %}multi-label
 reader: {{ info.thresholds|length }} findings, each at its own threshold{% else %}operating threshold
 {{ "%.3f"|format(info.threshold) }}{% endif %} &middot; policy <b>{{ policy }}</b> &middot; model digest <code>{{ info.digest[:16] }}</code>
 {% if info.defense %}&middot; behind {{ info.defense.defenses|map(attribute="name")|join(", ") }}{% endif %}</p>
<section><label>Bearer token <input id="token" type="password" size="60" autocomplete="off"></label>
 <button id="save">Use token</button></section>
<section><form id="upload"><input id="file" type="file" name="file" accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg,application/dicom">
 <button type="submit">Analyse</button></form><p id="error"></p>
 <div class="row"><img id="preview" alt="uploaded image">
 <div id="result"><p>No analysis yet.</p></div></div></section>
<section><h2 style="font-size:1.1em">Past analyses (readers)</h2><button id="refresh">Refresh</button>
 <table><thead><tr><th>#</th><th>time</th><th>image</th><th>provenance</th><th>screening</th><th>diagnosis</th><th>receipt</th></tr></thead>
 <tbody id="list"></tbody></table></section>
<script>
const $ = id => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) sessionStorage.setItem("medadv-token", params.get("token"));
$("token").value = sessionStorage.getItem("medadv-token") || "";
$("save").onclick = () => { sessionStorage.setItem("medadv-token", $("token").value.trim()); refresh(); };
const auth = () => ({"Authorization": "Bearer " + ($("token").value.trim())});
function text(s){ const d=document.createElement("span"); d.textContent = s; return d.innerHTML; }
function badge(cls, label){ return `<span class="badge ${text(cls)}">${text(label)}</span>`; }
function findings(d){  // a multi-label reader: every finding, its probability, threshold and decision
  const rows = d.findings.map(f => `<tr><td>${text(f.name)}</td><td>${f.probability.toFixed(3)}</td>
    <td>${f.threshold.toFixed(3)}</td><td>${badge(f.decision==="present"?"positive":"negative", f.decision)}</td></tr>`).join("");
  return `<p>Diagnosis: ${badge(d.any_finding?"positive":"negative", d.any_finding?"finding present":"no finding")}
    ${text(d.present.join(", "))}</p><table class="findings"><thead><tr><th>finding</th><th>probability</th>
    <th>threshold</th><th>decision</th></tr></thead><tbody>${rows}</tbody></table>`;
}
function verdict(d){  // the list's diagnosis cell
  if (d.findings) return badge(d.any_finding?"positive":"negative", d.any_finding ? d.present.join(", ") : "no finding");
  return badge(d.positive?"positive":"negative", d.label);
}
function show(a){
  const p=a.provenance, s=a.screening, d=a.diagnosis;
  let h = `<p>Provenance: ${badge(p.status, p.status)}<br><small>${text(p.detail)}</small></p>`;
  h += s ? `<p>Screening (feature squeezing): ${badge(s.flagged?"flagged":"clear", s.flagged?"flagged":"clear")}
           score ${s.score.toFixed(3)} (threshold ${s.threshold}${s.range ? `; range 0 to ${s.range[1]}` : ""})</p>` : `<p>Screening: ${badge("withheld","not run")}</p>`;
  h += d && d.findings ? findings(d) : d ? `<p>Diagnosis: ${badge(d.positive?"positive":"negative", d.label)} P(disease) = ${d.p_disease.toFixed(3)}
           at threshold ${d.threshold.toFixed(3)}</p>` : `<p>Diagnosis: ${badge("withheld","withheld")} <small>${text(a.withheld||"")}</small></p>`;
  if (a.disagreement_map) h += `<p>Where squeezing moves the prediction:<br><img alt="disagreement map"
           width="140" height="140" style="image-rendering:pixelated;border:1px solid #ccc" src="${a.disagreement_map}"></p>`;
  h += `<p><small>analysis <code>${text(a.id)}</code> &middot; position #${a.ledger_position} &middot; ${text(a.time)}</small></p>`;
  $("result").innerHTML = h;
}
async function call(url, opts){
  const r = await fetch(url, Object.assign({headers: auth()}, opts||{}));
  const body = await r.json();
  if (!r.ok) throw new Error((body.error||r.status) + " " + (body.fix||""));
  return body;
}
$("upload").onsubmit = async ev => {
  ev.preventDefault(); $("error").textContent = "";
  const f = $("file").files[0]; if (!f) return;
  if (/image\/(png|jpeg)/.test(f.type)) $("preview").src = URL.createObjectURL(f);
  const fd = new FormData(); fd.append("file", f);
  try { show(await call("/v1/analyses", {method:"POST", body: fd})); refresh(); }
  catch(e){ $("error").textContent = e.message; }
};
async function receipt(id){
  try { const r = await call(`/v1/analyses/${id}/receipt`);
    const a = document.createElement("a"); a.href = URL.createObjectURL(new Blob([JSON.stringify(r, null, 1)], {type:"application/json"}));
    a.download = `receipt-${id}.json`; a.click(); } catch(e){ $("error").textContent = e.message; }
}
async function refresh(){
  if (!$("token").value.trim()) return;
  try { const body = await call("/v1/analyses?since=0&limit=200");
    $("list").innerHTML = body.analyses.reverse().map(a => `<tr><td>${a.ledger_position}</td><td>${text(a.time)}</td>
      <td>${text((a.image||{}).name||"")}</td><td>${badge(a.provenance.status, a.provenance.status)}</td>
      <td>${a.screening ? badge(a.screening.flagged?"flagged":"clear", a.screening.score.toFixed(3)) : "-"}</td>
      <td>${a.diagnosis ? verdict(a.diagnosis) : "withheld"}</td>
      <td><a href="#" onclick="receipt('${text(a.id)}');return false">download</a></td></tr>`).join("");
  } catch(e){ /* submitters cannot list: the table stays empty */ }
}
$("refresh").onclick = refresh;
(async () => { if (params.get("analysis")) { try { show(await call(`/v1/analyses/${params.get("analysis")}`)); }
  catch(e){ $("error").textContent = e.message; } } refresh(); })();
</script></body></html>
"""

_env = Environment(loader=DictLoader({"index.html.j2": PAGE}), autoescape=select_autoescape(default=True))


def render_page(info: dict[str, Any], policy: str) -> str:
    return _env.get_template("index.html.j2").render(info=info, policy=policy)
