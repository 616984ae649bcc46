"use strict";
const TOKEN_KEY = "shoal.token";  // the dashboard's key: one token for both pages
const tokenInput = document.getElementById("token");
tokenInput.value = localStorage.getItem(TOKEN_KEY) || "";
tokenInput.addEventListener("change", () => localStorage.setItem(TOKEN_KEY, tokenInput.value.trim()));

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

// A small example body from a schema: enough to edit, not a full generator.
function example(schema, doc, depth) {
  if (!schema || depth > 4) return null;
  if (schema.$ref) return example(doc.components.schemas[schema.$ref.split("/").pop()], doc, depth + 1);
  if (schema.default !== undefined) return schema.default;
  if (schema.type === "object" || schema.properties) {
    const out = {};
    for (const name of schema.required || Object.keys(schema.properties || {}).slice(0, 3)) {
      out[name] = example((schema.properties || {})[name], doc, depth + 1);
    }
    return out;
  }
  if (schema.type === "integer" || schema.type === "number") return schema.minimum || 1;
  if (schema.type === "array") return [];
  if (schema.type === "boolean") return false;
  return "";
}

function operation(path, method, op, shared, doc) {
  const params = [...(shared || []), ...(op.parameters || [])];
  const form = el("form");
  for (const p of params) {
    form.append(el("label", {}, `${p.name} (${p.in}${p.required ? ", required" : ""}) `,
      el("input", {name: p.name, "data-in": p.in})));
  }
  const body = op.requestBody && op.requestBody.content["application/json"];
  let textarea = null;
  if (body) {
    textarea = el("textarea", {name: "body"});
    textarea.value = JSON.stringify(example(body.schema, doc, 0), null, 2);
    form.append(el("label", {}, "body (JSON)", textarea));
  }
  const result = el("div");
  form.append(el("button", {type: "submit"}, "send"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let url = path;
    const query = new URLSearchParams();
    for (const input of form.querySelectorAll("input[data-in]")) {
      if (input.dataset.in === "path") url = url.replace(`{${input.name}}`, encodeURIComponent(input.value));
      else if (input.value !== "") query.set(input.name, input.value);
    }
    if ([...query].length) url += "?" + query;
    const headers = {};
    const token = tokenInput.value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    if (textarea) headers["Content-Type"] = "application/json";
    result.replaceChildren(el("p", {class: "muted"}, `${method.toUpperCase()} ${url} …`));
    try {
      const r = await fetch(url, {method: method.toUpperCase(), headers, body: textarea ? textarea.value : undefined});
      let text = await r.text();
      try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not JSON: as it is */ }
      result.replaceChildren(el("p", {}, el("span", {class: "status"}, `${r.status} ${r.statusText}`)), el("pre", {}, text));
    } catch (err) {
      result.replaceChildren(el("p", {class: "status"}, String(err)));
    }
  });
  const responses = el("ul");
  for (const [code, resp] of Object.entries(op.responses || {})) {
    responses.append(el("li", {}, el("code", {}, code), " " + (resp.description || "")));
  }
  return el("details", {class: "op"},
    el("summary", {}, el("span", {class: `method ${method.toUpperCase()}`}, method.toUpperCase()),
      el("code", {}, path), " ", el("span", {class: "muted"}, op.summary || "")),
    form, result, el("p", {class: "muted"}, "responses"), responses);
}

async function main() {
  const ops = document.getElementById("ops");
  let doc;
  try {
    doc = await (await fetch("/openapi.json")).json();
  } catch (err) {
    ops.replaceChildren(el("p", {class: "status"}, "cannot read /openapi.json: " + err));
    return;
  }
  document.title = `${doc.info.title} ${doc.info.version}`;
  const items = [];
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (method !== "parameters") items.push(operation(path, method, op, item.parameters, doc));
    }
  }
  ops.replaceChildren(el("p", {class: "muted"}, `${doc.info.title} ${doc.info.version}: ${items.length} operations`), ...items);
}
main();
