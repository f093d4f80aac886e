// cpp browser UI: jobs, clustering overview, cluster pages, map and run pages, and curation.
// One file, no build step, no third-party code. Served by `cpp serve` (data from the /v1 API) and copied into
// static galleries (`cpp gallery`, <html data-static="1">: data from data/*.js, read only).
// Every piece of user data (names, captions, file names) reaches the page through textContent / attributes
// set one by one (see h()); nothing is ever parsed as HTML.
"use strict";
(() => {
  const STATIC = document.documentElement.dataset.static === "1";
  const main = document.getElementById("main");
  const crumbs = document.getElementById("crumbs");
  const account = document.getElementById("account");
  const PAGE = 60;

  // ------------------------------------------------------------------------------------------- helpers

  /** An element with properties and children; strings become text nodes, never markup. */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key === "style") Object.assign(el.style, value); // CSSOM, allowed by the CSP (no inline style)
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    return el;
  }

  const fmt = new Intl.NumberFormat();
  const num = (n) => fmt.format(n);
  const fixed = (x, d = 2) => (typeof x === "number" ? x.toFixed(d) : "–");
  const hue = (id) => (id * 137.508) % 360;
  const colour = (id, l = 50) => (id < 0 ? `hsl(0 0% ${l + 20}%)` : `hsl(${hue(id)} 62% ${l}%)`);

  function toast(message, kind = "ok") {
    const box = document.getElementById("toast");
    const item = h("div", { class: `toast ${kind}`, text: message });
    box.append(item);
    setTimeout(() => item.remove(), kind === "error" ? 7000 : 3500);
  }

  function cookie(name) {
    const found = document.cookie.split("; ").find((part) => part.startsWith(name + "="));
    return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
  }

  class SignInNeeded extends Error {}

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin" };
    if (method !== "GET") headers["X-CSRF-Token"] = cookie("cpp_csrf");
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401 && !path.startsWith("/ui/")) {
      go("#/login");
      throw new SignInNeeded("sign in first");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) { /* not a problem document */ }
      throw new Error(detail);
    }
    return response.status === 204 ? null : response.json();
  }

  // Static galleries: data/NAME.js calls cppStatic(NAME, payload).
  const loaded = {};
  const waiting = {};
  window.cppStatic = (name, payload) => {
    loaded[name] = payload;
    if (waiting[name]) waiting[name](payload);
  };
  function loadStatic(name) {
    if (loaded[name]) return Promise.resolve(loaded[name]);
    return new Promise((resolve, reject) => {
      waiting[name] = resolve;
      const script = h("script", { src: `data/${name}.js` });
      script.onerror = () => reject(new Error(`this gallery does not include ${name}`));
      document.head.append(script);
    });
  }

  function sortClusters(clusters, sort, descending) {
    const keys = {
      size: (c) => [c.size, -c.id],
      score: (c) => [c.score, -c.id],
      uncertain: (c) => [c.uncertain ? 1 : 0, -c.score, -c.id],
      name: (c) => [c.name.toLowerCase(), c.id],
    };
    const key = keys[sort] || keys.size;
    const sign = descending ? -1 : 1;
    return [...clusters].sort((a, b) => {
      const x = key(a), y = key(b);
      for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return (x[i] < y[i] ? -1 : 1) * sign;
      return 0;
    });
  }

  const qs = (params) => new URLSearchParams(params).toString();
  const base = (id) => `/v1/clusterings/${encodeURIComponent(id)}`;
  const data = STATIC
    ? {
        overview: async (id, p) => {
          const all = await loadStatic("overview");
          const needle = p.q.trim().toLowerCase();
          const chosen = sortClusters(
            all.clusters.filter((c) => c.name.toLowerCase().includes(needle)), p.sort, p.descending);
          return { ...all, total: chosen.length, offset: p.offset, limit: p.limit,
                   clusters: chosen.slice(p.offset, p.offset + p.limit) };
        },
        cluster: async (id, k, p) => {
          const page = await loadStatic(`cluster-${k}`);
          return { ...page, included: page.members.length, offset: p.offset, limit: p.limit,
                   members: page.members.slice(p.offset, p.offset + p.limit) };
        },
        map: () => loadStatic("map"),
        run: () => loadStatic("run"),
        thumb: (id, row) => `thumbs/${row}.jpg`,
      }
    : {
        overview: (id, p) => api("GET", `${base(id)}/overview?${qs(p)}`),
        cluster: (id, k, p) => api("GET", `${base(id)}/clusters/${k}?${qs(p)}`),
        map: (id) => api("GET", `${base(id)}/map`),
        run: (id) => api("GET", `${base(id)}/run`),
        thumb: (id, row) => `${base(id)}/thumbnails/${row}`,
      };

  function thumb(id, row, alt) {
    const img = h("img", { src: data.thumb(id, row), alt: alt || "", loading: "lazy", decoding: "async" });
    img.addEventListener("error", () => img.classList.add("missing"), { once: true });
    return img;
  }

  function go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  function parseHash() {
    const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
    return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query || "") };
  }

  function setCrumbs(items) {
    crumbs.replaceChildren(
      ...items.flatMap((item, i) => [
        ...(i ? [h("span", { class: "sep", text: "/" })] : []),
        item.href ? h("a", { href: item.href, text: item.label }) : h("span", { text: item.label }),
      ]));
  }

  function pager(total, offset, limit, onPage) {
    if (total <= limit) return h("div", { class: "pager muted", text: `${num(total)} shown` });
    const last = Math.min(offset + limit, total);
    return h("div", { class: "pager" },
      h("button", { class: "btn", disabled: offset === 0 || null, onclick: () => onPage(Math.max(0, offset - limit)) }, "‹ Previous"),
      h("span", { class: "muted", text: `${num(offset + 1)}–${num(last)} of ${num(total)}` }),
      h("button", { class: "btn", disabled: last >= total || null, onclick: () => onPage(offset + limit) }, "Next ›"));
  }

  function badge(text, kind) { return h("span", { class: `badge ${kind || ""}`, text }); }

  function loading() { main.replaceChildren(h("div", { class: "loading", text: "Loading…" })); }

  function failed(error) {
    if (error instanceof SignInNeeded) return;
    main.replaceChildren(h("div", { class: "panel error-panel" }, h("h2", { text: "Something went wrong" }), h("p", { text: error.message })));
  }

  // --------------------------------------------------------------------------------------------- login

  function loginPage() {
    setCrumbs([{ label: "Sign in" }]);
    const key = h("input", { type: "password", id: "api-key", name: "key", autocomplete: "current-password", required: true, placeholder: "API key" });
    const form = h("form", { class: "panel login", onsubmit: async (event) => {
      event.preventDefault();
      try {
        await api("POST", "/ui/login", { key: key.value });
        toast("Signed in");
        await showAccount();
        go("#/");
      } catch (error) { toast(error.message, "error"); }
    } },
    h("h1", { text: "Sign in" }),
    h("p", { class: "muted", text: "This service needs an API key (one of CPP_API_KEYS). It is kept in an HttpOnly cookie for this browser." }),
    h("label", { for: "api-key", text: "API key" }), key,
    h("button", { class: "btn primary", type: "submit" }, "Sign in"));
    main.replaceChildren(form);
    key.focus();
  }

  async function showAccount() {
    if (STATIC) { account.replaceChildren(badge("static gallery · read only", "muted")); return; }
    const session = await api("GET", "/ui/session");
    account.replaceChildren();
    if (session.keys_required && session.signed_in) {
      account.append(h("button", { class: "btn ghost", onclick: async () => {
        await api("POST", "/ui/logout");
        await showAccount();
        go("#/login");
      } }, "Sign out"));
    }
  }

  // ---------------------------------------------------------------------------------------------- jobs

  let jobTimer = null;

  async function jobsPage() {
    setCrumbs([{ label: "Jobs" }]);
    const path = h("input", { id: "folder-path", type: "text", placeholder: "/data/photos", required: true });
    const labels = h("input", { id: "labels-from-folders", type: "checkbox" });
    const files = h("input", { id: "upload-files", type: "file", multiple: true, accept: "image/*,.zip", required: true });
    const table = h("tbody");
    const submitFolder = h("form", { class: "panel", onsubmit: async (event) => {
      event.preventDefault();
      try {
        await api("POST", "/v1/jobs", { source: { type: "folder", path: path.value, labels_from_folders: labels.checked } });
        toast("Job queued");
        refresh();
      } catch (error) { toast(error.message, "error"); }
    } },
    h("h2", { text: "Cluster a folder on the server" }),
    h("label", { for: "folder-path", text: "Folder (under the allowed roots)" }), path,
    h("label", { class: "check" }, labels, " Use folder names as ground truth"),
    h("button", { class: "btn primary", type: "submit" }, "Start job"));
    const upload = h("form", { class: "panel", onsubmit: async (event) => {
      event.preventDefault();
      const form = new FormData();
      for (const file of files.files) form.append("files", file, file.name);
      try {
        await api("POST", "/v1/jobs/upload", form);
        toast("Upload queued");
        refresh();
      } catch (error) { toast(error.message, "error"); }
    } },
    h("h2", { text: "Upload images" }),
    h("label", { for: "upload-files", text: "Images or .zip archives" }), files,
    h("button", { class: "btn primary", type: "submit" }, "Upload and start"));

    main.replaceChildren(
      h("div", { class: "page-head" }, h("h1", { text: "Jobs" })),
      h("div", { class: "two" }, submitFolder, upload),
      h("section", { class: "panel" }, h("h2", { text: "Recent jobs" }),
        h("table", { class: "table" },
          h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Source", "Created", ""].map((t) => h("th", { text: t })))),
          table)));

    async function refresh() {
      let page;
      try { page = await api("GET", "/v1/jobs?limit=50"); } catch (error) { failed(error); return; }
      table.replaceChildren(...page.items.map(jobRow));
      if (!page.items.length) table.append(h("tr", {}, h("td", { colspan: 6, class: "muted", text: "No jobs yet." })));
      clearTimeout(jobTimer);
      if (page.items.some((j) => j.status === "queued" || j.status === "running") && parseHash().parts.length === 0) {
        jobTimer = setTimeout(refresh, 1500);
      }
    }
    refresh();
  }

  function jobRow(job) {
    const p = job.progress;
    const share = p && p.total ? Math.min(1, p.done / p.total) : job.status === "succeeded" ? 1 : 0;
    const bar = h("div", { class: "bar", title: p ? `${p.stage}: ${p.done}/${p.total ?? "?"}` : job.status },
      h("span", { style: { width: `${(share * 100).toFixed(1)}%` } }));
    const actions = [];
    if (job.status === "succeeded" && (job.kind || "cluster") === "cluster") {
      actions.push(h("a", { class: "btn small primary", href: `#/c/${encodeURIComponent(job.id)}` }, "Open clusters"));
    }
    if (job.status === "queued" || job.status === "running") {
      actions.push(h("button", { class: "btn small", onclick: async () => {
        try { await api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/cancel`); toast("Cancelling"); } catch (e) { toast(e.message, "error"); }
      } }, "Cancel"));
    }
    return h("tr", {},
      h("td", { class: "mono", text: job.id.slice(0, 8) }),
      h("td", {}, badge(job.status, job.status)),
      h("td", {}, bar, h("div", { class: "muted small", text: p ? `${p.stage} ${num(p.done)}${p.total ? " / " + num(p.total) : ""}` : job.error ? job.error.detail || "" : "" })),
      h("td", { class: "ellipsis", title: job.source ? job.source.path : "", text: job.source ? job.source.path : "" }),
      h("td", { class: "muted", text: new Date(job.created_at).toLocaleString() }),
      h("td", { class: "actions" }, actions));
  }

  // ------------------------------------------------------------------------------------------ overview

  async function overviewPage(id, query) {
    const state = {
      sort: query.get("sort") || "size",
      descending: query.has("descending") ? query.get("descending") === "true" : (query.get("sort") || "size") !== "name",
      q: query.get("q") || "",
      offset: Number(query.get("offset") || 0),
      limit: PAGE,
    };
    loading();
    let page;
    try { page = await data.overview(id, state); } catch (error) { failed(error); return; }
    id = page.id && STATIC ? page.id : id;
    setCrumbs(STATIC ? [{ label: "Clusters" }] : [{ label: "Jobs", href: "#/" }, { label: `Clustering ${id.slice(0, 8)}` }]);
    const selected = new Set();
    const mergeBar = h("div", { class: "mergebar hidden" });
    const updateMerge = () => {
      mergeBar.classList.toggle("hidden", selected.size === 0);
      mergeBar.replaceChildren(
        h("span", { text: `${selected.size} selected` }),
        h("button", { class: "btn primary", id: "merge-selected", disabled: selected.size < 2 || null, onclick: async () => {
          const ids = [...selected];
          try {
            const out = await api("POST", `${base(id)}/merge`, { clusters: ids, expected_revision: page.revision });
            toast(`Merged ${ids.length} clusters (revision ${out.revision})`);
            go(`#/c/${encodeURIComponent(id)}/k/${out.clusters[0]}`);
          } catch (error) { toast(error.message, "error"); }
        } }, "Merge selected"),
        h("button", { class: "btn ghost", onclick: () => { selected.clear(); for (const box of main.querySelectorAll(".card input")) box.checked = false; updateMerge(); } }, "Clear"));
    };
    const navigate = (changes) => {
      const next = { ...state, ...changes };
      const params = { sort: next.sort, descending: next.descending, q: next.q, offset: next.offset };
      go(`#/c/${encodeURIComponent(id)}?${qs(params)}`);
    };
    const search = h("input", { type: "search", id: "filter", placeholder: "Filter by name", value: state.q });
    let timer = null;
    search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => navigate({ q: search.value, offset: 0 }), 300);
    });
    const sort = h("select", { id: "sort", onchange: () => navigate({ sort: sort.value, descending: sort.value !== "name", offset: 0 }) },
      [["size", "Size"], ["score", "Name score"], ["uncertain", "Uncertain first"], ["name", "Name"]].map(([v, t]) =>
        h("option", { value: v, selected: v === state.sort || null, text: t })));
    const direction = h("button", { class: "btn", title: "Reverse the order", onclick: () => navigate({ descending: !state.descending, offset: 0 }) },
      state.descending ? "↓" : "↑");

    const actions = [
      h("a", { class: "btn", href: `#/c/${encodeURIComponent(id)}/map` }, "Map"),
      h("a", { class: "btn", href: `#/c/${encodeURIComponent(id)}/run` }, "Run"),
    ];
    if (page.outliers) actions.push(h("a", { class: "btn", href: `#/c/${encodeURIComponent(id)}/k/-1` }, `Outliers (${num(page.outliers)})`));
    if (!STATIC) {
      actions.push(h("details", { class: "menu" }, h("summary", { class: "btn" }, "Export"),
        h("div", { class: "menu-items" }, [["json", "Result JSON"], ["csv", "CSV"], ["coco", "COCO JSON"]].map(([f, t]) =>
          h("a", { href: `${base(id)}/export?format=${f}`, download: "" }, t)))));
      if (page.revision > 0) {
        actions.push(h("button", { class: "btn", id: "undo", onclick: async () => {
          try {
            const out = await api("POST", `${base(id)}/restore`, { revision: page.revision - 1, expected_revision: page.revision });
            toast(`Restored revision ${page.revision - 1} as revision ${out.revision}`);
            route();
          } catch (error) { toast(error.message, "error"); }
        } }, "Undo last edit"));
      }
    }

    const cards = page.clusters.map((c) => {
      const box = STATIC ? null : h("input", { type: "checkbox", title: "Select for merging", "aria-label": `Select ${c.name}`, onclick: (event) => event.stopPropagation(),
        onchange: (event) => { if (event.target.checked) selected.add(c.id); else selected.delete(c.id); updateMerge(); } });
      const link = `#/c/${encodeURIComponent(id)}/k/${c.id}`;
      return h("article", { class: "card", "data-cluster": c.id },
        h("a", { class: "mosaic", href: link, "aria-label": c.name }, c.thumbs.map((row) => thumb(id, row))),
        h("div", { class: "card-body" },
          h("div", { class: "card-title" },
            h("span", { class: "swatch", style: { background: colour(c.id) } }),
            h("a", { class: "name", href: link, title: c.name, text: c.name }),
            box),
          h("div", { class: "card-meta" },
            h("span", { text: `${num(c.size)} images` }),
            h("span", { class: "muted", text: `score ${fixed(c.score)}` }),
            c.uncertain ? badge("uncertain", "warn") : null)));
    });

    main.replaceChildren(
      h("div", { class: "page-head" },
        h("div", {},
          h("h1", { text: STATIC ? "Clusters" : `Clustering ${id.slice(0, 8)}` }),
          h("div", { class: "muted", text: `${num(page.members)} images · ${num(page.clusters_total)} clusters · revision ${page.revision}${page.outliers ? ` · ${num(page.outliers)} outliers` : ""}` })),
        h("div", { class: "actions" }, actions)),
      h("div", { class: "toolbar" }, search, sort, direction,
        h("span", { class: "muted", text: page.total === page.clusters_total ? "" : `${num(page.total)} match` })),
      mergeBar,
      cards.length ? h("div", { class: "grid", id: "clusters" }, cards) : h("p", { class: "panel muted", text: "No cluster matches." }),
      pager(page.total, page.offset, page.limit, (offset) => navigate({ offset })));
    if (state.q) { search.focus(); search.setSelectionRange(search.value.length, search.value.length); }
  }

  // ------------------------------------------------------------------------------------------- cluster

  async function clusterPage(id, k, query) {
    const offset = Number(query.get("offset") || 0);
    loading();
    let page;
    try { page = await data.cluster(id, k, { offset, limit: PAGE }); } catch (error) { failed(error); return; }
    if (STATIC) id = page.id;
    const c = page.cluster;
    const home = `#/c/${encodeURIComponent(id)}`;
    setCrumbs([...(STATIC ? [] : [{ label: "Jobs", href: "#/" }]), { label: STATIC ? "Clusters" : `Clustering ${id.slice(0, 8)}`, href: home }, { label: c.name }]);
    const selected = new Set();
    const edit = async (label, method, path, body, after) => {
      try {
        const out = await api(method, path, { ...body, expected_revision: page.revision });
        toast(`${label} (revision ${out.revision})`);
        after(out);
      } catch (error) { toast(error.message, "error"); }
    };

    const head = h("div", { class: "cluster-head" },
      h("span", { class: "swatch big", style: { background: colour(c.id) } }),
      h("div", {},
        h("h1", { id: "cluster-name", text: c.name }),
        h("div", { class: "card-meta" },
          h("span", { text: `${num(c.size)} images` }),
          c.id >= 0 ? h("span", { class: "muted", text: `name score ${fixed(c.score, 3)}` }) : null,
          c.uncertain ? badge("uncertain name", "warn") : null,
          h("span", { class: "muted", text: `revision ${page.revision}` }))));

    const tools = [];
    if (!STATIC && c.id >= 0) {
      const name = h("input", { type: "text", id: "rename-input", value: c.name, maxlength: 200, "aria-label": "New name" });
      tools.push(h("form", { class: "tool", onsubmit: (event) => {
        event.preventDefault();
        edit("Renamed", "POST", `${base(id)}/clusters/${c.id}/rename`, { name: name.value }, () => route());
      } }, h("label", { for: "rename-input", text: "Name" }), h("div", { class: "row" }, name, h("button", { class: "btn primary", id: "rename", type: "submit" }, "Rename"))));
      const parts = h("input", { type: "number", id: "split-parts", min: 2, max: 20, value: 2, "aria-label": "Parts" });
      tools.push(h("form", { class: "tool", onsubmit: (event) => {
        event.preventDefault();
        edit("Split", "POST", `${base(id)}/clusters/${c.id}/split`, { parts: Number(parts.value) }, () => go(home));
      } }, h("label", { for: "split-parts", text: "Split into parts" }), h("div", { class: "row" }, parts, h("button", { class: "btn", id: "split", type: "submit" }, "Split"))));
    }
    const alternatives = c.alternatives && c.alternatives.length
      ? h("div", { class: "alternatives" }, h("span", { class: "muted", text: "Other names:" }),
          c.alternatives.map((a) => STATIC
            ? h("span", { class: "chip", text: `${a.name} · ${fixed(a.score, 3)}` })
            : h("button", { class: "chip", title: "Use this name", onclick: () => edit("Renamed", "POST", `${base(id)}/clusters/${c.id}/rename`, { name: a.name }, () => route()) },
                h("span", { text: a.name }), h("span", { class: "muted", text: ` ${fixed(a.score, 3)}` }))))
      : null;

    const selectionBar = h("div", { class: "mergebar hidden" });
    const updateSelection = () => {
      selectionBar.classList.toggle("hidden", selected.size === 0);
      const target = h("select", { id: "move-target", "aria-label": "Target cluster" },
        page.clusters.filter((o) => o.id !== c.id).map((o) => h("option", { value: o.id, text: `${o.name} (${num(o.size)})` })));
      selectionBar.replaceChildren(
        h("span", { text: `${selected.size} selected` }),
        h("span", { class: "muted", text: "Move to" }), target,
        h("button", { class: "btn primary", id: "move", onclick: () => edit("Moved", "POST", `${base(id)}/move`, { rows: [...selected], to: Number(target.value) }, () => route()) }, "Move"),
        c.id >= 0 ? h("button", { class: "btn danger", id: "mark-outliers", onclick: () => edit("Marked as outliers", "POST", `${base(id)}/outliers`, { rows: [...selected] }, () => route()) }, "Mark as outliers") : null,
        h("button", { class: "btn ghost", onclick: () => { selected.clear(); for (const t of main.querySelectorAll(".tile.selected")) t.classList.remove("selected"); updateSelection(); } }, "Clear"));
    };

    const tiles = page.members.map((m) => {
      const tile = h("figure", { class: `tile${m.low ? " low" : ""}`, "data-row": m.row, title: `${m.name} · confidence ${fixed(m.confidence, 3)}` },
        thumb(id, m.row, m.name),
        h("figcaption", {}, h("span", { class: "ellipsis", text: m.name }), h("span", { class: m.low ? "conf low" : "conf", text: fixed(m.confidence, 2) })),
        m.low ? h("span", { class: "flag", text: "low" }) : null);
      if (!STATIC) {
        tile.addEventListener("click", () => {
          if (selected.has(m.row)) selected.delete(m.row); else selected.add(m.row);
          tile.classList.toggle("selected", selected.has(m.row));
          updateSelection();
        });
      }
      return tile;
    });

    const run = page.run || {};
    const side = h("aside", { class: "panel side" },
      h("h3", { text: "Run" }),
      h("dl", {},
        [["Encoder", run.encoder], ["Head", run.head], ["Space", run.space], ["K", `${run.k} (${run.k_method})`],
        ["Low confidence", `below ${fixed(page.low_below, 3)}`]].flatMap(([t, v]) => [h("dt", { text: t }), h("dd", { text: v ?? "–" })])),
      h("a", { href: `${home}/run` }, "Run details ›"));

    const note = STATIC && page.included < page.total
      ? h("p", { class: "muted", text: `This gallery includes the ${num(page.included)} most confident of ${num(page.total)} images.` }) : null;
    main.replaceChildren(
      h("div", { class: "page-head" }, head, h("div", { class: "actions" }, h("a", { class: "btn", href: home }, "‹ All clusters"))),
      h("div", { class: "cluster-layout" },
        h("div", {},
          tools.length ? h("div", { class: "panel tools" }, tools) : null,
          alternatives,
          selectionBar,
          !STATIC && tiles.length ? h("p", { class: "muted small", text: "Click images to select them, then move them or mark them as outliers." }) : null,
          h("div", { class: "tiles", id: "members" }, tiles),
          note,
          pager(Math.min(page.total, STATIC ? page.included : page.total), offset, PAGE, (o) => go(`#/c/${encodeURIComponent(id)}/k/${c.id}?offset=${o}`))),
        side));
  }

  // ----------------------------------------------------------------------------------------------- map

  async function mapPage(id) {
    loading();
    let m;
    try { m = await data.map(id); } catch (error) { failed(error); return; }
    if (STATIC) id = m.id;
    const home = `#/c/${encodeURIComponent(id)}`;
    setCrumbs([...(STATIC ? [] : [{ label: "Jobs", href: "#/" }]), { label: STATIC ? "Clusters" : `Clustering ${id.slice(0, 8)}`, href: home }, { label: "Map" }]);
    const canvas = h("canvas", { id: "map", width: 1000, height: 640, "aria-label": "Map of the collection" });
    const tip = h("div", { class: "tip hidden" });
    const names = new Map(m.clusters.map((c) => [c.id, c]));
    const pad = 16;
    const ratio = window.devicePixelRatio || 1;
    let px = [], py = [];
    function draw() {
      const width = canvas.clientWidth || 1000, height = canvas.clientHeight || 640;
      canvas.width = width * ratio; canvas.height = height * ratio;
      const ctx = canvas.getContext("2d");
      ctx.scale(ratio, ratio);
      ctx.fillStyle = "#fbfcfd"; ctx.fillRect(0, 0, width, height);
      const radius = m.shown > 5000 ? 1.6 : 3;
      px = m.x.map((x) => pad + (x / 1000) * (width - 2 * pad));
      py = m.y.map((y) => pad + (1 - y / 1000) * (height - 2 * pad));
      ctx.globalAlpha = 0.8;
      for (let i = 0; i < m.shown; i++) {
        ctx.fillStyle = colour(m.cluster[i]);
        ctx.beginPath(); ctx.arc(px[i], py[i], radius, 0, 2 * Math.PI); ctx.fill();
      }
    }
    function nearest(event) {
      const rect = canvas.getBoundingClientRect();
      const x = event.clientX - rect.left, y = event.clientY - rect.top;
      let best = -1, distance = 64;
      for (let i = 0; i < m.shown; i++) {
        const d = (px[i] - x) ** 2 + (py[i] - y) ** 2;
        if (d < distance) { distance = d; best = i; }
      }
      return { best, x, y };
    }
    canvas.addEventListener("mousemove", (event) => {
      const { best, x, y } = nearest(event);
      if (best < 0) { tip.classList.add("hidden"); canvas.style.cursor = "default"; return; }
      const c = names.get(m.cluster[best]);
      tip.textContent = c ? `${c.name} · ${num(c.size)} images` : "outlier";
      tip.style.left = `${x + 14}px`; tip.style.top = `${y + 10}px`;
      tip.classList.remove("hidden");
      canvas.style.cursor = "pointer";
    });
    canvas.addEventListener("mouseleave", () => tip.classList.add("hidden"));
    canvas.addEventListener("click", (event) => {
      const { best } = nearest(event);
      if (best >= 0) go(`${home}/k/${m.cluster[best]}`);
    });
    const legend = h("div", { class: "legend" }, [...m.clusters].sort((a, b) => b.size - a.size).slice(0, 40).map((c) =>
      h("a", { href: `${home}/k/${c.id}` }, h("span", { class: "swatch", style: { background: colour(c.id) } }), h("span", { class: "ellipsis", text: c.name }), h("span", { class: "muted", text: num(c.size) }))));
    main.replaceChildren(
      h("div", { class: "page-head" }, h("div", {}, h("h1", { text: "Map" }),
        h("div", { class: "muted", text: `${num(m.shown)} of ${num(m.members)} images, first two principal components of the features; click a point to open its cluster` }))),
      h("div", { class: "map-layout" }, h("div", { class: "panel map-box" }, canvas, tip), h("div", { class: "panel" }, h("h3", { text: "Largest clusters" }), legend)));
    draw();
    window.addEventListener("resize", draw, { once: true });
  }

  // ----------------------------------------------------------------------------------------------- run

  function table(rows) {
    return h("table", { class: "table kv" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { text: k }), h("td", { text: typeof v === "object" && v !== null ? JSON.stringify(v) : v ?? "–" })))));
  }

  function curve(ks, lengths, chosen) {
    const width = 560, height = 240, left = 64, bottom = 36, top = 16, right = 16;
    const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "curve", role: "img", "aria-label": "Coding length by K" });
    const min = Math.min(...lengths), max = Math.max(...lengths);
    const x = (k) => left + ((k - ks[0]) / Math.max(1, ks[ks.length - 1] - ks[0])) * (width - left - right);
    const y = (v) => top + (1 - (v - min) / Math.max(1e-9, max - min)) * (height - top - bottom);
    plot.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" }));
    plot.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }));
    plot.append(svg("polyline", { points: ks.map((k, i) => `${x(k)},${y(lengths[i])}`).join(" "), class: "line" }));
    ks.forEach((k, i) => {
      const dot = svg("circle", { cx: x(k), cy: y(lengths[i]), r: k === chosen ? 5 : 2.5, class: k === chosen ? "chosen" : "dot" });
      const title = svg("title", {}); title.textContent = `K=${k}: ${fixed(lengths[i], 1)} bits`;
      dot.append(title); plot.append(dot);
    });
    const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; plot.append(t); };
    label(`K = ${ks[0]}`, { x: left, y: height - 12, class: "tick" });
    label(`${ks[ks.length - 1]}`, { x: width - right, y: height - 12, class: "tick end" });
    label(`${fixed(max, 0)}`, { x: left - 6, y: top + 10, class: "tick end" });
    label(`${fixed(min, 0)}`, { x: left - 6, y: height - bottom, class: "tick end" });
    label("coding length (bits)", { x: left + 8, y: top + 10, class: "tick" });
    label(`chosen K = ${chosen}`, { x: x(chosen) + 8, y: y(lengths[ks.indexOf(chosen)]) - 8, class: "tick" });
    return plot;
  }

  async function runPage(id) {
    loading();
    let r;
    try { r = await data.run(id); } catch (error) { failed(error); return; }
    if (STATIC) id = r.id;
    const home = `#/c/${encodeURIComponent(id)}`;
    setCrumbs([...(STATIC ? [] : [{ label: "Jobs", href: "#/" }]), { label: STATIC ? "Clusters" : `Clustering ${id.slice(0, 8)}`, href: home }, { label: "Run" }]);
    const run = r.run;
    const ks = run.k_selection;
    const timings = Object.entries(run.timings_s || {});
    main.replaceChildren(
      h("div", { class: "page-head" }, h("div", {}, h("h1", { text: "Run" }), h("div", { class: "muted", text: `created ${run.created_at} · seed ${run.seed} · ${run.device}` }))),
      h("div", { class: "two" },
        h("section", { class: "panel" }, h("h2", { text: "Encoder" }), table(Object.entries(run.encoder))),
        h("section", { class: "panel" }, h("h2", { text: "Head" }), table(Object.entries(run.head)))),
      h("div", { class: "two" },
        h("section", { class: "panel" }, h("h2", { text: "Number of clusters" }),
          h("p", { class: "muted", text: `K = ${ks.k}, chosen by ${ks.method.replace("_", " ")}` }),
          ks.candidates.length && ks.coding_length.length ? curve(ks.candidates, ks.coding_length, ks.candidates[ks.coding_length.indexOf(Math.min(...ks.coding_length))]) : null),
        h("section", { class: "panel" }, h("h2", { text: "Timings" }),
          h("div", { class: "timings" }, timings.map(([stage, s]) => {
            const total = (run.timings_s.total || Math.max(...timings.map((t) => t[1]))) || 1;
            return h("div", { class: "timing" }, h("span", { text: stage }), h("div", { class: "bar" }, h("span", { style: { width: `${Math.min(100, (s / total) * 100).toFixed(1)}%` } })), h("span", { class: "muted", text: `${fixed(s, 2)} s` }));
          })),
          h("h3", { text: "Counts" }), table(Object.entries(run.counts)),
          r.metrics ? h("div", {}, h("h3", { text: "Against ground truth" }), table(Object.entries(r.metrics).map(([k, v]) => [k, fixed(v, 3)]))) : null)),
      h("section", { class: "panel" }, h("h2", { text: `Skipped files (${num(r.skipped_total)})` }),
        r.skipped.length ? h("table", { class: "table" }, h("thead", {}, h("tr", {}, h("th", { text: "File" }), h("th", { text: "Reason" }))),
          h("tbody", {}, r.skipped.map((s) => h("tr", {}, h("td", { class: "ellipsis", text: s.path || s.key }), h("td", { text: s.reason })))))
          : h("p", { class: "muted", text: "None." }),
        r.skipped_total > r.skipped.length ? h("p", { class: "muted", text: `and ${num(r.skipped_total - r.skipped.length)} more (see the result JSON)` }) : null),
      h("section", { class: "panel" }, h("h2", { text: `Edits (${r.edits.length})` }),
        r.edits.length ? h("ol", { class: "edits" }, r.edits.map((e) => h("li", {}, badge(e.op), h("span", { class: "mono", text: ` r${e.revision} ` }), h("span", { class: "muted", text: `${e.at} ${JSON.stringify(e.args)}` }))))
          : h("p", { class: "muted", text: "No edits: this is the clustering as fitted." })));
  }

  // ------------------------------------------------------------------------------------------- routing

  async function route() {
    clearTimeout(jobTimer);
    const { parts, query } = parseHash();
    const [first, id, page, k] = parts;
    window.scrollTo(0, 0);
    if (first === "login") return loginPage();
    if (STATIC) {
      if (first !== "c") return overviewPage("static", query);
    } else if (!first) return jobsPage();
    if (first === "c" && id) {
      if (!page) return overviewPage(id, query);
      if (page === "k") return clusterPage(id, Number(k), query);
      if (page === "map") return mapPage(id);
      if (page === "run") return runPage(id);
    }
    main.replaceChildren(h("div", { class: "panel" }, h("h2", { text: "Not found" }), h("a", { href: "#/" }, "Back")));
  }

  window.addEventListener("hashchange", route);
  showAccount().catch(() => {}).finally(route);
})();
