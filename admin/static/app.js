// Keystile admin page: sign in with an API key (kept in sessionStorage, for this tab only),
// then manage keys and, for admins, users through the admin JSON API of this same origin.
// Data reaches the page only through textContent, .value and DOM nodes: never parsed as HTML.
"use strict";

(() => {
  const STORAGE_KEY = "keystile.apiKey";
  const API_ROOT = new URL("../", document.baseURI); // the page is <root>/admin/api-keys
  const DAY_MS = 86400000;
  const MAX_GRACE_SECONDS = 30 * 86400;

  const state = {
    key: null, // the signed-in API key, mirrored in sessionStorage
    admin: false,
    userId: "", // the key's own user id and key id: public parts of the key
    keyId: "",
    email: "",
    servers: [], // [{name, granted}] from GET /api/servers
    users: [], // admins only
    keys: [],
  };
  let editing = null; // the key the key dialog edits; null while creating
  let originsShown = ""; // the origins field as the key dialog opened with it
  let rotating = null; // the key the rotate dialog rotates
  let granting = null; // the user the grants dialog changes
  let toolsOwner = null; // the user whose tools the tools dialog changes
  let confirmed = null; // {run, then}: what the confirm dialog does once confirmed
  const refocus = new Map(); // dialog -> where focus goes if its opener is gone once it closes

  const $ = (id) => document.getElementById(id);

  // --- talking to the API ---

  class Problem extends Error {
    constructor(message, status = 0, field = "") {
      super(message);
      this.status = status;
      this.field = field;
    }
  }

  // One call with the key: the Response when it is a success, else a Problem carrying the
  // API's own message (and the field it names).
  async function send(key, method, path, body, accept = "application/json") {
    const headers = { Accept: accept, Authorization: `Bearer ${key}` };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(new URL(path, API_ROOT), init);
    } catch {
      throw new Problem("Keystile's admin API could not be reached. Try again in a moment.");
    }
    if (response.ok) return response;
    const data = parseJson(await response.text());
    const message = data && typeof data.message === "string"
      ? data.message
      : `The admin API answered ${response.status}.`;
    throw new Problem(message, response.status, (data && data.field) || "");
  }

  function parseJson(text) {
    try {
      return text ? JSON.parse(text) : null;
    } catch {
      return null;
    }
  }

  async function request(key, method, path, body) {
    const response = await send(key, method, path, body);
    return parseJson(await response.text());
  }

  // A call with the session's key; a 401 means the key stopped working: sign out.
  async function withSession(call) {
    try {
      return await call(state.key);
    } catch (err) {
      if (err.status === 401) signOut(`You were signed out: ${err.message}`);
      throw err;
    }
  }

  const api = (method, path, body) => withSession((key) => request(key, method, path, body));

  // A file from the API (CSV), as a Blob: fetched with the key header, which a link cannot send.
  const apiFile = (path, accept) =>
    withSession(async (key) => (await send(key, "GET", path, undefined, accept)).blob());

  const keyPath = (key, action = "") =>
    `api/keys/${encodeURIComponent(key.id)}${action ? `/${action}` : ""}`;
  const userPath = (user, tail = "") => `api/users/${encodeURIComponent(user.id)}${tail}`;

  // --- small DOM and formatting helpers ---

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });
  const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
    dateStyle: "medium",
    timeStyle: "short",
  });
  const relativeFormat = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  const UNITS = [
    ["year", 365 * 86400],
    ["month", 30 * 86400],
    ["week", 7 * 86400],
    ["day", 86400],
    ["hour", 3600],
    ["minute", 60],
  ];

  function relativeTime(iso) {
    const seconds = (Date.parse(iso) - Date.now()) / 1000;
    if (Math.abs(seconds) < 45) return "just now";
    for (const [unit, size] of UNITS) {
      if (Math.abs(seconds) >= size) return relativeFormat.format(Math.trunc(seconds / size), unit);
    }
    return relativeFormat.format(Math.round(seconds / 60), "minute");
  }

  function timeCell(iso, text) {
    return el("time", { datetime: iso, title: dateTimeFormat.format(new Date(iso)) }, text);
  }
  const dateCell = (iso) => timeCell(iso, dateFormat.format(new Date(iso)));

  function badge(text, kind = text) {
    return el("span", { class: `badge badge-${kind}` }, text);
  }

  function serversText(servers) {
    if (servers.length === 1 && servers[0] === "*") return "All servers";
    if (servers.length === 0) return "None";
    return servers.join(", ");
  }

  function serversCell(servers) {
    if (servers.length === 1 && servers[0] === "*") return "All servers";
    if (servers.length === 0) return el("span", { class: "muted" }, "None");
    const count = `${servers.length} ${servers.length === 1 ? "server" : "servers"}`;
    return el(
      "span",
      { title: servers.join(", ") },
      count,
      el("span", { class: "visually-hidden" }, `: ${servers.join(", ")}`),
    );
  }

  const isExactTool = (pattern) => !pattern.startsWith("!") && !pattern.includes("*");

  function toolsText(tools) {
    if (tools === null) return "all tools";
    if (tools.length === 0) return "no tools";
    return tools.join(", ");
  }

  // "3 tools" when every entry names one tool, "3 patterns" when some use * or !.
  function toolsCount(tools) {
    const noun = tools.every(isExactTool) ? "tool" : "pattern";
    return `${tools.length} ${noun}${tools.length === 1 ? "" : "s"}`;
  }

  function toolsCell(tools) {
    if (tools === null) return "All tools";
    if (tools.length === 0) return el("span", { class: "muted" }, "No tools");
    return el(
      "span",
      { title: tools.join("\n") },
      toolsCount(tools),
      el("span", { class: "visually-hidden" }, `: ${tools.join(", ")}`),
    );
  }

  // A key's allowed_origins: null is any origin; [] is none (no browser page may use it).
  function originsCell(origins) {
    if (origins === null || origins === undefined) return "Any";
    if (origins.length === 0) {
      return el("span", { class: "muted", title: "No browser page may use this key" }, "None");
    }
    const count = `${origins.length} ${origins.length === 1 ? "origin" : "origins"}`;
    return el(
      "span",
      { title: origins.join("\n") },
      count,
      el("span", { class: "visually-hidden" }, `: ${origins.join(", ")}`),
    );
  }

  function notify(text) {
    $("page-error").textContent = "";
    $("notice").textContent = text;
  }

  function showError(err) {
    $("notice").textContent = "";
    $("page-error").textContent = err.message;
  }

  function setOptions(select, options, value) {
    select.replaceChildren(...options.map(([v, label]) => el("option", { value: v }, label)));
    if (value !== undefined) select.value = value;
  }

  // An email that may break before its "@" rather than anywhere.
  function emailText(email) {
    const at = email.lastIndexOf("@");
    if (at <= 0) return email;
    return el("span", {}, email.slice(0, at), el("wbr"), email.slice(at));
  }

  function userLabel(user) {
    return user.display_name ? `${user.display_name} <${user.email}>` : user.email;
  }

  // --- dialogs ---

  function clearInvalid(dialog) {
    for (const node of dialog.querySelectorAll("[aria-invalid]")) {
      node.removeAttribute("aria-invalid");
    }
  }

  function openDialog(dialog, focus) {
    clearInvalid(dialog);
    dialog.showModal();
    (focus || dialog.querySelector("input, select, textarea, button")).focus();
  }

  // Runs a dialog's work: buttons disabled meanwhile; a failure stays in the dialog, with the
  // field the API named marked invalid and focused. `fields` maps an API field to the id of
  // its control, or to a function giving the control.
  async function runDialog(dialog, errorId, fields, work) {
    const buttons = dialog.querySelectorAll("button");
    for (const b of buttons) b.disabled = true;
    dialog.setAttribute("aria-busy", "true");
    $(errorId).textContent = "";
    clearInvalid(dialog);
    try {
      await work();
    } catch (err) {
      if (!state.key) return; // signed out meanwhile
      $(errorId).textContent = err.message;
      const target = fields[err.field];
      const input = typeof target === "function" ? target() : target && $(target);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        input.focus();
      }
    } finally {
      for (const b of buttons) b.disabled = false;
      dialog.removeAttribute("aria-busy");
    }
  }

  function closeAllDialogs() {
    for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  }

  // Asks first (focus starts on Cancel); `run` makes the change (a failure stays in the
  // dialog), and `then` refreshes the page once the dialog has closed.
  function confirmAction(title, text, action, run, then) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = action;
    $("confirm-error").textContent = "";
    confirmed = { run, then };
    openDialog($("confirm-dialog"), $("confirm-cancel"));
  }

  async function submitConfirm(event) {
    event.preventDefault();
    const dialog = $("confirm-dialog");
    const { run, then } = confirmed;
    await runDialog(dialog, "confirm-error", {}, async () => {
      await run();
      dialog.close();
      await then();
    });
  }

  // A dialog closed and the element that opened it was re-rendered away: focus a sensible spot.
  function onDialogClosed(event) {
    // Lost: on the body, or still on a button of the dialog that just closed.
    const active = document.activeElement;
    const lost = !active || active === document.body || event.target.contains(active);
    const target = refocus.get(event.target);
    refocus.delete(event.target);
    if (!lost || !state.key) return;
    if (target) target();
    else panelTitle().focus();
  }

  // --- server pickers: "All servers" or a list of names (keys and user grants share it) ---

  function fillServerPicker(fieldset, selected, { noteUngranted }) {
    const all = selected.length === 1 && selected[0] === "*";
    const mode = fieldset.querySelector(`input[type="radio"][value="${all ? "all" : "some"}"]`);
    mode.checked = true;
    const list = fieldset.querySelector(".server-list");
    list.replaceChildren(
      ...state.servers.map((server) => {
        const box = el("input", { type: "checkbox", value: server.name });
        box.checked = !all && selected.includes(server.name);
        const note = noteUngranted && !server.granted
          ? el("span", { class: "hint" }, "(not granted to you)")
          : null;
        const text = el("span", {}, server.name, note ? " " : "", note);
        return el("label", { class: "check" }, box, text);
      }),
    );
    syncServerPicker(fieldset);
  }

  function syncServerPicker(fieldset) {
    const all = fieldset.querySelector('input[type="radio"][value="all"]').checked;
    for (const box of fieldset.querySelectorAll(".server-list input")) box.disabled = all;
  }

  function readServerPicker(fieldset) {
    if (fieldset.querySelector('input[type="radio"][value="all"]').checked) return ["*"];
    return [...fieldset.querySelectorAll(".server-list input:checked")].map((b) => b.value);
  }

  // The configured servers a user reaches; without the user's record (self-service: only
  // admins load users), the servers granted to the signed-in user.
  function reachableServers(user) {
    if (!user) return state.servers.filter((s) => s.granted).map((s) => s.name);
    const names = state.servers.map((s) => s.name);
    if (user.role === "admin" || user.servers.includes("*")) return names;
    return names.filter((name) => user.servers.includes(name));
  }

  // --- tool pickers: "All tools" (null), or discovered tools ticked plus free patterns ---

  // GET /api/servers/{name}/tools, asked once per dialog opening (the API keeps answers 60 s).
  const discoveries = new Map(); // server name -> promise of {server, tools, fetched_at}

  function discoverTools(server) {
    if (!discoveries.has(server)) {
      discoveries.set(server, api("GET", `api/servers/${encodeURIComponent(server)}/tools`));
    }
    return discoveries.get(server);
  }

  function discoveryFailure(err) {
    const instead = "Patterns below still work.";
    if (err.status === 502) {
      return `Its tools could not be listed: the server did not answer. ${instead}`;
    }
    if (err.status === 404) return `Its tools are not listed for you. ${instead}`;
    return `Its tools could not be listed: ${err.message} ${instead}`;
  }

  const patternLines = (text) => text.split("\n").map((line) => line.trim()).filter(Boolean);
  const serverOf = (pattern) => pattern.replace(/^!/, "").split("/", 1)[0];
  let toolOptionCount = 0; // for unique ids of tool options

  // One picker per dialog (keys, user tools): a fieldset with "all"/"some" radios, a group of
  // tool checkboxes per server in scope, and a patterns field. `scope()` names the servers.
  class ToolPicker {
    constructor(fieldset, scope) {
      this.fieldset = fieldset;
      this.scope = scope;
      this.picker = fieldset.querySelector(".tool-picker");
      this.groups = fieldset.querySelector(".tool-groups");
      this.patterns = fieldset.querySelector("textarea");
      this.ticked = new Set(); // "server/tool", kept while its server leaves the scope and returns
      this.unplaced = new Set(); // the record's plain names, until a discovered tool matches one
      this.shown = null; // the servers whose groups are on screen
      fieldset.addEventListener("change", (event) => this.onChange(event));
    }

    mode(value) {
      return this.fieldset.querySelector(`input[type="radio"][value="${value}"]`);
    }

    get allTools() {
      return this.mode("all").checked;
    }

    // Shows a record's tools: all patterns go to the patterns field, and each plain name moves
    // to its checkbox once its server's discovered tools include it.
    reset(tools = null) {
      this.mode(tools === null ? "all" : "some").checked = true;
      this.patterns.value = tools === null ? "" : tools.join("\n");
      this.ticked = new Set();
      this.unplaced = new Set((tools || []).filter(isExactTool));
      this.shown = null;
      this.groups.replaceChildren();
      this.sync();
    }

    // Follows the mode and the servers in scope; groups are rebuilt only when the servers change.
    sync() {
      this.picker.hidden = this.allTools;
      if (this.allTools) return;
      const servers = this.scope();
      const shown = servers.join("\n");
      if (shown === this.shown) return;
      this.shown = shown;
      this.groups.replaceChildren(...servers.map((server) => this.group(server)));
      if (servers.length === 0) {
        const none = "No MCP server in reach: only patterns apply.";
        this.groups.append(el("p", { class: "hint" }, none));
      }
    }

    onChange(event) {
      const pattern = event.target.dataset.tool;
      if (!pattern) {
        this.sync();
        return;
      }
      if (event.target.checked) this.ticked.add(pattern);
      else this.ticked.delete(pattern);
    }

    group(server) {
      const note = el("p", { class: "hint tool-note", role: "status" }, "Loading tools…");
      const list = el("div", { class: "tool-list" });
      this.fillGroup(server, note, list);
      return el("fieldset", { class: "tool-group" }, el("legend", {}, server), note, list);
    }

    async fillGroup(server, note, list) {
      let found;
      try {
        found = await discoverTools(server);
      } catch (err) {
        note.textContent = discoveryFailure(err);
        note.classList.add("tool-failure");
        return;
      }
      if (!list.isConnected) return; // the scope changed meanwhile
      this.place(server, found.tools);
      list.replaceChildren(...found.tools.map((tool) => this.option(server, tool)));
      note.textContent = found.tools.length ? "" : "This server lists no tools.";
      note.hidden = found.tools.length > 0;
    }

    // The record's plain names that this server offers leave the patterns field for checkboxes.
    place(server, tools) {
      const lines = this.patterns.value.split("\n");
      const present = new Set(lines.map((line) => line.trim()));
      const moved = new Set(
        tools
          .map((tool) => `${server}/${tool.name}`)
          .filter((name) => this.unplaced.has(name) && present.has(name)),
      );
      if (moved.size === 0) return;
      for (const name of moved) {
        this.unplaced.delete(name);
        this.ticked.add(name);
      }
      this.patterns.value = lines.filter((line) => !moved.has(line.trim())).join("\n");
    }

    option(server, tool) {
      const pattern = `${server}/${tool.name}`;
      const id = `${this.fieldset.id}-option-${++toolOptionCount}`;
      const box = el("input", {
        type: "checkbox",
        "data-tool": pattern,
        "aria-labelledby": `${id}-name`,
        "aria-describedby": tool.description ? `${id}-text` : null,
      });
      box.checked = this.ticked.has(pattern);
      const text = tool.description
        ? el("span", { class: "hint tool-description", id: `${id}-text`, title: tool.description },
          tool.description)
        : null;
      const name = el("code", { class: "tool-name", id: `${id}-name` }, tool.name);
      return el("label", { class: "check tool-option" }, box, el("span", {}, name, text));
    }

    // null for "All tools"; otherwise the ticked tools of the servers in scope, then the
    // patterns, each once.
    read() {
      if (this.allTools) return null;
      const servers = new Set(this.scope());
      const ticked = [...this.ticked].filter((name) => servers.has(serverOf(name))).sort();
      return [...new Set([...ticked, ...patternLines(this.patterns.value)])];
    }

    // Where a 422 on `tools` sends focus: the patterns field, or the mode when it is hidden.
    invalidTarget() {
      return this.allTools ? this.mode("all") : this.patterns;
    }
  }

  const keyTools = new ToolPicker($("key-tools"), () => keyToolServers());
  const userTools = new ToolPicker($("user-tools"), () => reachableServers(toolsOwner));

  // --- signing in and out ---

  function parseKeyIds(key) {
    const parts = key.split("-");
    return parts.length === 4 ? { userId: parts[1], keyId: parts[2] } : { userId: "", keyId: "" };
  }

  async function signIn(key) {
    if (!/^[\x21-\x7e]+$/.test(key)) {
      throw new Problem("An API key is one line of plain characters, like ks1-….");
    }
    // Admin-ness: listing every key answers 200 to an admin key and 403 to any other.
    let admin = true;
    let keys;
    try {
      keys = await request(key, "GET", "api/keys?all=true");
    } catch (err) {
      if (err.status !== 403) throw err;
      admin = false;
      keys = await request(key, "GET", "api/keys");
    }
    const servers = await request(key, "GET", "api/servers");
    const users = admin ? await request(key, "GET", "api/users") : [];
    sessionStorage.setItem(STORAGE_KEY, key);
    Object.assign(state, { key, admin, servers, users, keys }, parseKeyIds(key));
    const me = admin
      ? users.find((u) => u.id === state.userId)
      : (keys.find((k) => k.user_id === state.userId) || {}).user;
    state.email = (me && me.email) || "";
    showApp();
  }

  async function submitSignIn(event) {
    event.preventDefault();
    const input = $("sign-in-key");
    const button = $("sign-in-submit");
    $("sign-in-error").textContent = "";
    const key = input.value.trim();
    if (!key) {
      $("sign-in-error").textContent = "Paste an API key first.";
      input.focus();
      return;
    }
    button.disabled = true;
    try {
      await signIn(key);
      input.value = "";
    } catch (err) {
      $("sign-in-error").textContent = err.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      button.disabled = false;
    }
  }

  function signOut(message = "") {
    sessionStorage.removeItem(STORAGE_KEY);
    closeAllDialogs();
    Object.assign(state, {
      key: null, admin: false, userId: "", keyId: "", email: "", servers: [], users: [], keys: [],
    });
    // Nothing of the session stays in the page: tables, filters and dialog forms are cleared.
    for (const body of document.querySelectorAll("tbody")) body.replaceChildren();
    for (const form of document.querySelectorAll("dialog form")) form.reset();
    toolsOwner = null;
    keyTools.reset(null);
    userTools.reset(null);
    discoveries.clear();
    setOptions($("filter-user"), [["", "All users"]], "");
    resetUsage();
    $("app-view").hidden = true;
    $("session").hidden = true;
    $("sign-in-view").hidden = false;
    $("sign-in-error").textContent = message;
    $("notice").textContent = "";
    $("page-error").textContent = "";
    $("sign-in-key").removeAttribute("aria-invalid");
    $("sign-in-key").focus();
  }

  function showApp() {
    $("sign-in-view").hidden = true;
    $("app-view").hidden = false;
    $("session").hidden = false;
    const who = state.email || "your key";
    $("whoami").textContent = `Signed in as ${who}${state.admin ? " (admin)" : ""}`;
    $("tabs").hidden = false;
    $("tab-users").hidden = !state.admin;
    $("filter-user-field").hidden = !state.admin;
    $("keys-title").textContent = state.admin ? "API keys" : "Your API keys";
    $("keys-lead").textContent = state.admin
      ? "Every key of the workspace. Keys are shown in full only once, when created or rotated."
      : "Keys for your scripts and MCP clients. A key is shown in full only once, when " +
        "created or rotated.";
    $("filter-status").value = "";
    fillUserFilter();
    selectTab("keys");
    renderKeys();
    $("keys-title").focus();
  }

  // --- keys ---

  function fillUserFilter() {
    const select = $("filter-user");
    const current = select.value;
    const options = [["", "All users"], ...state.users.map((u) => [u.id, u.email])];
    setOptions(select, options, options.some(([v]) => v === current) ? current : "");
  }

  async function loadKeys() {
    const query = new URLSearchParams();
    const user = $("filter-user").value;
    const status = $("filter-status").value;
    if (state.admin) query.set(user ? "user_id" : "all", user || "true");
    if (status) query.set("status", status);
    const text = query.toString();
    state.keys = await api("GET", `api/keys${text ? `?${text}` : ""}`);
    renderKeys();
  }

  async function reloadKeys() {
    try {
      await loadKeys();
    } catch (err) {
      if (state.key) showError(err);
    }
  }

  // One row; each cell carries its column's label for the stacked (narrow) layout.
  function tableRow(attrs, cells) {
    const td = ([label, content]) => {
      const column = `col-${label.toLowerCase().replace(" ", "-")}`;
      return el("td", { "data-label": label, class: column }, content);
    };
    return el("tr", attrs, ...cells.map(td));
  }

  function keyColumns() {
    const columns = [
      ["Name", nameCell],
      ["Description", (k) => el("div", { class: "description" }, k.description || "—")],
      ["User", (k) => emailText((k.user && k.user.email) || k.user_id)],
      ["Key", (k) => el("code", { class: "prefix" }, k.prefix)],
      ["Servers", (k) => serversCell(k.servers)],
      ["Tools", (k) => toolsCell(k.tools)],
      ["Origins", (k) => originsCell(k.allowed_origins)],
      ["Permissions", (k) => k.permissions.join(", ") || "—"],
      ["Created", (k) => dateCell(k.created_at)],
      ["Last used", lastUsedCell],
      ["Expires", (k) => (k.expires_at ? dateCell(k.expires_at) : "Never")],
      ["Status", (k) => badge(k.status)],
      ["Actions", keyActions],
    ];
    return state.admin ? columns : columns.filter(([label]) => label !== "User");
  }

  // When the key was last used, and a link to its usage (revoked keys' usage stays).
  function lastUsedCell(key) {
    const when = el(
      "span",
      { class: "when" },
      key.last_used_at ? timeCell(key.last_used_at, relativeTime(key.last_used_at)) : "Never",
    );
    const link = el("a", {
      href: "#usage",
      class: "usage-link",
      "data-action": "usage",
      "aria-label": `Usage of ${key.name}`,
      onclick: (event) => {
        event.preventDefault();
        openUsage({ keyId: key.id }).then(() => $("usage-title").focus());
      },
    }, "Usage");
    return el("div", { class: "last-used" }, when, link);
  }

  function nameCell(key) {
    const mine = key.id === state.keyId
      ? el("span", { class: "session-key" }, "this session's key")
      : null;
    return el("div", { class: "key-name" }, key.name, mine);
  }

  function renderKeys() {
    const columns = keyColumns();
    const table = $("keys-table");
    table.tHead.replaceChildren(
      el("tr", {}, ...columns.map(([label]) => el("th", { scope: "col" }, label))),
    );
    const newest = (a, b) => Date.parse(b.created_at) - Date.parse(a.created_at);
    const keys = [...state.keys].sort(newest);
    table.tBodies[0].replaceChildren(
      ...keys.map((key) =>
        tableRow(
          { "data-key-id": key.id },
          columns.map(([label, cell]) => [label, cell(key)]),
        ),
      ),
    );
    const empty = keys.length === 0;
    table.parentElement.hidden = empty;
    $("keys-empty").hidden = !empty;
    if (!empty) return;
    const status = $("filter-status").value;
    const user = state.users.find((u) => u.id === $("filter-user").value);
    let title = "No API keys yet.";
    if (status) title = `No ${status} keys${user ? ` of ${user.email}` : ""}.`;
    else if (user) title = `${user.email} has no API keys yet.`;
    $("keys-empty-title").textContent = title;
    $("keys-empty-text").textContent = status
      ? "Pick another status above to see other keys."
      : "Create one with “Create API key”, then copy it from the dialog: it is shown only " +
        "once. Clients send it as “Authorization: Bearer <key>”." +
        (user ? " As an admin, pick this user as the owner." : "");
  }

  function keyActions(key) {
    if (key.status === "revoked") {
      const when = key.revoked_at ? ` ${relativeTime(key.revoked_at)}` : "";
      return el("span", { class: "muted" }, `Revoked${when}`);
    }
    const button = (label, action, onclick, kind = "") =>
      el("button", {
        type: "button",
        class: `small ${kind}`,
        "data-action": action,
        "aria-label": `${label} ${key.name}`,
        onclick,
      }, label);
    return el(
      "div",
      { class: "row-actions key-actions" },
      button("Edit", "edit", () => openKeyDialog(key)),
      button(key.is_active ? "Disable" : "Enable", "toggle", () => toggleKey(key)),
      button("Rotate", "rotate", () => openRotate(key)),
      button("Revoke", "revoke", () => confirmRevoke(key), "danger"),
    );
  }

  // After a re-render the clicked button is a new node: put focus back on its successor.
  function focusKeyAction(keyId, action) {
    const row = [...$("keys-table").tBodies[0].rows].find((r) => r.dataset.keyId === keyId);
    const target = row && row.querySelector(`[data-action="${action}"]`);
    (target || $("keys-title")).focus();
  }

  async function toggleKey(key) {
    const run = async () => {
      const updated = await api("POST", keyPath(key, key.is_active ? "disable" : "enable"));
      notify(`${updated.is_active ? "Enabled" : "Disabled"} “${updated.name}”.`);
    };
    const then = async () => {
      await reloadKeys();
      focusKeyAction(key.id, "toggle");
    };
    if (key.is_active && key.id === state.keyId) {
      confirmAction(
        `Disable “${key.name}”?`,
        "This is the key you are signed in with: disabling it signs you out of this page.",
        "Disable key",
        run,
        then,
      );
      return;
    }
    try {
      await run();
    } catch (err) {
      if (state.key) showError(err);
    }
    await then();
  }

  function confirmRevoke(key) {
    const own = key.id === state.keyId
      ? " This is the key you are signed in with: you will be signed out."
      : "";
    confirmAction(
      `Revoke “${key.name}”?`,
      "Every client using this key gets 401 at once. Revoking is permanent: the key cannot be " +
        `enabled again, only replaced by a new one.${own}`,
      "Revoke key",
      async () => {
        await api("DELETE", keyPath(key));
        notify(`Revoked “${key.name}”.`);
      },
      async () => {
        await reloadKeys();
        $("keys-title").focus();
      },
    );
  }

  function expiryOptions(key) {
    const options = [
      ["never", "Never"],
      ["30", "In 30 days"],
      ["90", "In 90 days"],
      ["custom", "On a date…"],
    ];
    if (!key) return options;
    const current = key.expires_at ? dateTimeFormat.format(new Date(key.expires_at)) : "never";
    return [["keep", `Keep as is (${current})`], ...options];
  }

  function readExpiry() {
    const choice = $("key-expiry").value;
    if (choice === "keep") return undefined;
    if (choice === "never") return null;
    if (choice === "custom") {
      const value = $("key-expiry-date").value; // yyyy-mm-dd
      if (!value) throw new Problem("Pick the expiry date.", 0, "expires_at_date");
      const [year, month, day] = value.split("-").map(Number);
      return new Date(year, month - 1, day, 23, 59, 59).toISOString();
    }
    return new Date(Date.now() + Number(choice) * DAY_MS).toISOString();
  }

  function syncKeyDialog() {
    $("key-expiry-date-field").hidden = $("key-expiry").value !== "custom";
    syncServerPicker($("key-servers"));
    keyTools.sync();
    // 'admin' only for keys of admin users, and only an admin can grant it.
    const owner = keyOwner();
    const allowed = state.admin && owner !== undefined && owner.role === "admin";
    const box = $("key-permissions").querySelector('input[value="admin"]');
    if (!allowed && !editing) box.checked = false; // an edit keeps what the key has
    box.disabled = !allowed;
    $("permission-admin-row").hidden = !state.admin && !box.checked;
    const locked = state.admin ? "only for keys of admin users" : "only an admin key changes it";
    $("permission-admin-hint").textContent = allowed ? "manage the workspace" : locked;
  }

  // The owner's record (admins only: others have no user list), or undefined.
  function keyOwner() {
    const ownerId = editing ? editing.user_id : $("key-owner").value || state.userId;
    return state.users.find((u) => u.id === ownerId);
  }

  // The servers whose tools the key dialog offers: those picked, or all its owner reaches.
  function keyToolServers() {
    const servers = readServerPicker($("key-servers"));
    return servers.length === 1 && servers[0] === "*" ? reachableServers(keyOwner()) : servers;
  }

  function openKeyDialog(key = null) {
    editing = key;
    const form = $("key-form");
    form.reset();
    $("key-error").textContent = "";
    $("key-dialog-title").textContent = key ? `Edit “${key.name}”` : "Create API key";
    $("key-submit").textContent = key ? "Save changes" : "Create API key";
    $("key-name").value = key ? key.name : "";
    $("key-description").value = key ? key.description : "";
    setOptions($("key-expiry"), expiryOptions(key), key ? "keep" : "never");
    $("key-expiry-date").min = new Date(Date.now() - new Date().getTimezoneOffset() * 60000)
      .toISOString()
      .slice(0, 10);
    $("key-owner-field").hidden = !state.admin || key !== null;
    if (state.admin && !key) {
      const others = state.users.filter((u) => u.id !== state.userId && u.is_active);
      const me = ["", `Me (${state.email || "this key's user"})`];
      setOptions($("key-owner"), [me, ...others.map((u) => [u.id, userLabel(u)])], "");
    }
    fillServerPicker($("key-servers"), key ? key.servers : ["*"], { noteUngranted: !state.admin });
    discoveries.clear();
    keyTools.reset(key ? key.tools : null);
    $("key-origins").value = key && key.allowed_origins ? key.allowed_origins.join("\n") : "";
    originsShown = $("key-origins").value;
    const permissions = key ? key.permissions : ["mcp"];
    for (const box of form.querySelectorAll('input[name="permission"]')) {
      box.checked = permissions.includes(box.value);
    }
    syncKeyDialog();
    openDialog($("key-dialog"), $("key-name"));
  }

  function keyFormValues() {
    const values = {
      name: $("key-name").value.trim(),
      description: $("key-description").value.trim(),
      servers: readServerPicker($("key-servers")),
      permissions: [...$("key-permissions").querySelectorAll("input:checked")].map((b) => b.value),
      tools: keyTools.read(),
    };
    // Left as shown, the origins stay as they are: an empty list (no page at all) shows as an
    // empty field too, and must not become null (any page) because another field changed.
    if (!editing || $("key-origins").value !== originsShown) values.allowed_origins = readOrigins();
    if (!values.name) throw new Problem("Give the key a name.", 0, "name");
    const expiry = readExpiry();
    if (expiry !== undefined) values.expires_at = expiry;
    return values;
  }

  // One origin per line; none: any origin (null). The API checks and canonicalises each.
  function readOrigins() {
    const origins = [...new Set(patternLines($("key-origins").value))];
    return origins.length ? origins : null;
  }

  function changedFields(key, values) {
    const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
    const changes = {};
    for (const [field, value] of Object.entries(values)) {
      const before = Array.isArray(key[field]) ? [...key[field]].sort() : key[field];
      const after = Array.isArray(value) ? [...value].sort() : value;
      if (!same(before, after)) changes[field] = value;
    }
    return changes;
  }

  const KEY_FIELDS = {
    name: "key-name",
    description: "key-description",
    user_id: "key-owner",
    expires_at: "key-expiry",
    expires_at_date: "key-expiry-date",
    tools: () => keyTools.invalidTarget(),
    allowed_origins: "key-origins",
  };

  async function submitKey(event) {
    event.preventDefault();
    const dialog = $("key-dialog");
    await runDialog(dialog, "key-error", KEY_FIELDS, async () => {
      const values = keyFormValues();
      if (editing) {
        const changes = changedFields(editing, values);
        if (Object.keys(changes).length === 0) {
          dialog.close();
          notify("Nothing changed.");
          return;
        }
        const updated = await api("PATCH", keyPath(editing), changes);
        dialog.close();
        notify(`Saved “${updated.name}”.`);
        await reloadKeys();
        focusKeyAction(updated.id, "edit");
        return;
      }
      // "All tools" and no origins leave `tools` and `allowed_origins` out: a key limited to
      // some tools or origins then passes its own on (for any other key, out is null).
      if (values.tools === null) delete values.tools;
      if (values.allowed_origins === null) delete values.allowed_origins;
      const owner = $("key-owner").value;
      const created = await api("POST", "api/keys", owner ? { ...values, user_id: owner } : values);
      dialog.close();
      notify(`Created “${created.name}”.`);
      showNewKey(created, `API key “${created.name}” created`);
      await reloadKeys();
    });
  }

  function openRotate(key) {
    rotating = key;
    $("rotate-title").textContent = `Rotate “${key.name}”`;
    $("rotate-grace").value = "0";
    $("rotate-error").textContent = "";
    openDialog($("rotate-dialog"), $("rotate-grace"));
  }

  async function submitRotate(event) {
    event.preventDefault();
    const dialog = $("rotate-dialog");
    await runDialog(dialog, "rotate-error", { grace_seconds: "rotate-grace" }, async () => {
      const raw = $("rotate-grace").value.trim();
      const grace = raw === "" ? 0 : Number(raw);
      if (!Number.isFinite(grace) || grace < 0 || grace > MAX_GRACE_SECONDS) {
        const message = "The grace period is a number of seconds from 0 to 2592000 (30 days).";
        throw new Problem(message, 0, "grace_seconds");
      }
      const rotated = await api("POST", keyPath(rotating, "rotate"), { grace_seconds: grace });
      if (rotated.id === state.keyId) {
        // The session's own key: carry on with its new secret.
        state.key = rotated.key;
        sessionStorage.setItem(STORAGE_KEY, rotated.key);
      }
      refocus.set($("reveal-dialog"), () => focusKeyAction(rotated.id, "rotate"));
      dialog.close();
      notify(`Rotated “${rotated.name}”.`);
      showNewKey(rotated, `New key for “${rotated.name}”`);
      await reloadKeys();
    });
  }

  // The full key, shown once: it lives only in this dialog and is removed when it closes.
  function showNewKey(record, title) {
    $("reveal-title").textContent = title;
    const input = el("textarea", {
      id: "reveal-key",
      rows: 2,
      readonly: true,
      spellcheck: "false",
      autocomplete: "off",
      "aria-describedby": "reveal-warning",
    });
    input.value = record.key;
    $("reveal-slot").replaceChildren(el("label", { for: "reveal-key" }, "Your new API key"), input);
    $("copy-status").textContent = "";
    openDialog($("reveal-dialog"), $("copy-key"));
  }

  async function copyKey() {
    const input = $("reveal-key");
    if (!input) return;
    const status = $("copy-status");
    try {
      await navigator.clipboard.writeText(input.value);
      status.textContent = "Copied to the clipboard.";
    } catch {
      // No async clipboard (plain http off loopback, or permission refused): select and copy.
      input.focus();
      input.select();
      let copied = false;
      try {
        copied = document.execCommand("copy");
      } catch {
        copied = false;
      }
      status.textContent = copied
        ? "Copied to the clipboard."
        : "The key is selected: press Ctrl+C (⌘C on a Mac) to copy it.";
    }
  }

  // --- users (admins) ---

  async function loadUsers() {
    state.users = await api("GET", "api/users");
    renderUsers();
    fillUserFilter();
  }

  async function reloadUsers() {
    try {
      await loadUsers();
    } catch (err) {
      if (state.key) showError(err);
    }
  }

  function renderUsers() {
    const rows = state.users.map((user) => {
      const you = user.id === state.userId ? el("span", { class: "session-key" }, "you") : null;
      const cells = [
        ["Email", el("div", { class: "key-name" }, emailText(user.email), you)],
        ["Display name", user.display_name || el("span", { class: "muted" }, "—")],
        ["Role", roleSelect(user)],
        ["Server access", serversText(user.servers)],
        ["Tools", userToolsCell(user)],
        ["Status", user.is_active ? badge("active") : badge("disabled")],
        ["Created", dateCell(user.created_at)],
        ["Actions", userActions(user)],
      ];
      return tableRow({ "data-user-id": user.id }, cells);
    });
    $("users-table").tBodies[0].replaceChildren(...rows);
  }

  function userToolsCell(user) {
    if (user.role !== "admin") return toolsCell(user.tools);
    const why = "Admins hold every tool; limit an admin's keys instead.";
    return el(
      "span",
      { title: why },
      "All tools (admin)",
      el("span", { class: "visually-hidden" }, `: ${why}`),
    );
  }

  function roleSelect(user) {
    const select = el("select", { "aria-label": `Role of ${user.email}`, "data-action": "role" });
    setOptions(select, [["member", "member"], ["admin", "admin"]], user.role);
    select.addEventListener("change", async () => {
      const role = select.value;
      try {
        const updated = await api("PATCH", userPath(user), { role });
        notify(`${updated.email} is now ${updated.role === "admin" ? "an admin" : "a member"}.`);
      } catch (err) {
        if (state.key) showError(err);
      }
      await reloadUsers();
      focusUserAction(user.id, "role");
    });
    return select;
  }

  function userActions(user) {
    const button = (label, action, onclick, kind = "") =>
      el("button", {
        type: "button",
        class: `small ${kind}`,
        "data-action": action,
        "aria-label": `${label} ${user.email}`,
        onclick,
      }, label);
    return el(
      "div",
      { class: "row-actions" },
      button("Server access", "grants", () => openGrants(user)),
      user.role === "admin" ? null : button("Tools", "tools", () => openUserTools(user)),
      button("Keys", "keys", () => showUserKeys(user)),
      user.is_active
        ? button("Disable", "toggle", () => confirmDisableUser(user), "danger")
        : button("Enable", "toggle", () => setUserActive(user, true)),
    );
  }

  function focusUserAction(userId, action) {
    const row = [...$("users-table").tBodies[0].rows].find((r) => r.dataset.userId === userId);
    const target = row && row.querySelector(`[data-action="${action}"]`);
    (target || $("users-title")).focus();
  }

  async function setUserActive(user, active) {
    const updated = await api("PATCH", userPath(user), { is_active: active }).catch((err) => {
      if (state.key) showError(err);
      return null;
    });
    if (updated) notify(`${updated.is_active ? "Enabled" : "Disabled"} ${updated.email}.`);
    await reloadUsers();
    focusUserAction(user.id, "toggle");
  }

  function confirmDisableUser(user) {
    confirmAction(
      `Disable ${user.email}?`,
      "Every key of this user stops working at once. You can enable the user again later." +
        (user.id === state.userId ? " This is you: you will be signed out." : ""),
      "Disable user",
      async () => {
        const updated = await api("PATCH", userPath(user), { is_active: false });
        notify(`Disabled ${updated.email}.`);
      },
      async () => {
        await reloadUsers();
        focusUserAction(user.id, "toggle");
      },
    );
  }

  function showUserKeys(user) {
    selectTab("keys");
    $("filter-user").value = user.id;
    $("filter-status").value = "";
    reloadKeys().then(() => $("keys-title").focus());
  }

  function openAddUser() {
    $("user-form").reset();
    $("user-error").textContent = "";
    openDialog($("user-dialog"), $("user-email"));
  }

  async function submitUser(event) {
    event.preventDefault();
    const dialog = $("user-dialog");
    const fields = { email: "user-email", display_name: "user-display-name", role: "user-role" };
    await runDialog(dialog, "user-error", fields, async () => {
      const email = $("user-email").value.trim();
      if (!email) throw new Problem("Enter the user's email address.", 0, "email");
      const created = await api("POST", "api/users", {
        email,
        display_name: $("user-display-name").value.trim(),
        role: $("user-role").value,
      });
      dialog.close();
      notify(`Added ${created.email}. Grant server access with “Server access”.`);
      await reloadUsers();
      focusUserAction(created.id, "grants");
    });
  }

  function openGrants(user) {
    granting = user;
    $("grants-title").textContent = `Server access for ${user.email}`;
    $("grants-error").textContent = "";
    fillServerPicker($("grant-servers"), user.servers, { noteUngranted: false });
    openDialog($("grants-dialog"), $("grant-servers").querySelector("input:checked"));
  }

  async function submitGrants(event) {
    event.preventDefault();
    const dialog = $("grants-dialog");
    await runDialog(dialog, "grants-error", {}, async () => {
      const servers = readServerPicker($("grant-servers"));
      const updated = await api("PUT", userPath(granting, "/servers"), { servers });
      dialog.close();
      notify(`${updated.email} may reach: ${serversText(updated.servers)}.`);
      await reloadUsers();
      focusUserAction(updated.id, "grants");
    });
  }

  function openUserTools(user) {
    toolsOwner = user;
    $("tools-title").textContent = `Tools for ${user.email}`;
    $("tools-error").textContent = "";
    discoveries.clear();
    userTools.reset(user.tools);
    openDialog($("tools-dialog"), $("user-tools").querySelector("input:checked"));
  }

  async function submitUserTools(event) {
    event.preventDefault();
    const dialog = $("tools-dialog");
    const fields = { tools: () => userTools.invalidTarget() };
    await runDialog(dialog, "tools-error", fields, async () => {
      const tools = userTools.read();
      const updated = await api("PUT", userPath(toolsOwner, "/tools"), { tools });
      dialog.close();
      notify(`${updated.email} may call: ${toolsText(updated.tools)}.`);
      await reloadUsers();
      focusUserAction(updated.id, "tools");
    });
  }

  // --- usage (SPEC §7): requests per day or hour, top tools and keys, recent calls ---

  const HOUR_MS = 3600000;
  const TOP_ROWS = 10;
  const CALLS_PAGE = 50;
  // The window: whole UTC days (today counts as one) or whole UTC hours (this one counts).
  const WINDOWS = {
    "24h": { unit: "hour", step: HOUR_MS, count: 24, text: "the last 24 hours" },
    "7d": { unit: "day", step: DAY_MS, count: 7, text: "the last 7 days" },
    "30d": { unit: "day", step: DAY_MS, count: 30, text: "the last 30 days" },
  };
  const SVG_NS = document.getElementById("usage-chart").namespaceURI; // no URL in this file

  const usage = {
    keys: [], // every key in reach, revoked ones too (their usage stays): names and the filter
    tools: new Set(), // tool names seen in answers, for the tool filter
    chart: null, // {buckets, unit, width}: what the chart shows, redrawn when its width changes
    callsBefore: null, // next_before of the last page of calls
    serial: 0, // the latest load; answers of older loads are dropped
    redraw: false,
  };

  const countFormat = new Intl.NumberFormat();
  const msFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  const percentFormat = new Intl.NumberFormat(undefined, {
    style: "percent",
    maximumFractionDigits: 1,
  });
  const dayLabel = new Intl.DateTimeFormat(undefined, {
    month: "short",
    day: "numeric",
    timeZone: "UTC",
  });
  const dayLong = new Intl.DateTimeFormat(undefined, {
    weekday: "short",
    month: "short",
    day: "numeric",
    year: "numeric",
    timeZone: "UTC",
  });
  const hourLabel = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit",
    minute: "2-digit",
    hourCycle: "h23",
    timeZone: "UTC",
  });
  const hourLong = new Intl.DateTimeFormat(undefined, {
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    hourCycle: "h23",
    timeZone: "UTC",
  });
  const callTimeFormat = new Intl.DateTimeFormat(undefined, {
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });

  const msText = (ms) => (ms === null || ms === undefined ? "—" : msFormat.format(ms));
  const plural = (n, noun) => `${countFormat.format(n)} ${noun}${n === 1 ? "" : "s"}`;

  function usageWindow() {
    return WINDOWS[$("usage-window").value] || WINDOWS["7d"];
  }

  function windowStart(choice) {
    const now = Date.now();
    return Math.floor(now / choice.step) * choice.step - (choice.count - 1) * choice.step;
  }

  // The filters chosen, as API parameters (the same names on /api/usage and /api/calls).
  function usageFilters() {
    const filters = {};
    const fields = [
      ["user_id", "usage-user"],
      ["key_id", "usage-key"],
      ["server", "usage-server"],
      ["tool", "usage-tool"],
    ];
    for (const [name, id] of fields) {
      if ($(id).value) filters[name] = $(id).value;
    }
    return filters;
  }

  const usagePath = (route, params) => `api/${route}?${new URLSearchParams(params)}`;

  function usageParams(extra = {}) {
    const from = new Date(windowStart(usageWindow())).toISOString();
    return { from, ...usageFilters(), ...extra };
  }

  // --- the key and filter lists ---

  async function loadUsageKeys() {
    const everyone = state.admin ? "all=true&" : "";
    const [live, revoked] = await Promise.all([
      api("GET", `api/keys?${everyone}`),
      api("GET", `api/keys?${everyone}status=revoked`),
    ]);
    usage.keys = [...live, ...revoked].sort((a, b) => a.name.localeCompare(b.name));
  }

  function usageKey(keyId) {
    return usage.keys.find((k) => k.id === keyId);
  }

  function keyOptionLabel(key) {
    const owner = state.admin && key.user ? ` · ${key.user.email}` : "";
    return `${key.name}${owner}${key.status === "revoked" ? " (revoked)" : ""}`;
  }

  // The key filter lists the keys of the user picked (admins), or every key in reach.
  function fillUsageKeys() {
    const user = $("usage-user").value;
    const keys = usage.keys.filter((k) => !user || k.user_id === user);
    const select = $("usage-key");
    const current = select.value;
    const options = [["", "All keys"], ...keys.map((k) => [k.id, keyOptionLabel(k)])];
    setOptions(select, options, options.some(([v]) => v === current) ? current : "");
  }

  function fillUsageTools() {
    const select = $("usage-tool");
    const current = select.value;
    if (current) usage.tools.add(current);
    const names = [...usage.tools].sort((a, b) => a.localeCompare(b));
    setOptions(select, [["", "All tools"], ...names.map((n) => [n, n])], current);
  }

  function fillUsageFilters() {
    $("usage-user-field").hidden = !state.admin;
    const user = $("usage-user");
    const users = [["", "All users"], ...state.users.map((u) => [u.id, u.email])];
    setOptions(user, users, users.some(([v]) => v === user.value) ? user.value : "");
    const server = $("usage-server");
    const servers = [["", "All servers"], ...state.servers.map((s) => [s.name, s.name])];
    setOptions(server, servers, servers.some(([v]) => v === server.value) ? server.value : "");
    fillUsageKeys();
    fillUsageTools();
  }

  // Opens the view; `keyId` narrows it to one key (the keys table's "Usage" links).
  async function openUsage({ keyId = "" } = {}) {
    notify("");
    selectTab("usage");
    $("usage-lead").textContent = state.admin
      ? "Requests made with the workspace's keys on the data plane: MCP servers, chat and " +
        "/api/me. Days and hours are UTC."
      : "Requests made with your keys on the data plane: MCP servers, chat and /api/me. " +
        "Days and hours are UTC.";
    await reloadUsage(async () => {
      await loadUsageKeys();
      if (keyId) {
        $("usage-user").value = "";
        $("usage-server").value = "";
        $("usage-tool").value = "";
      }
      fillUsageFilters();
      if (keyId) $("usage-key").value = keyId;
    });
  }

  // --- loading ---

  // Loads the view again for the filters chosen (after `prepare`, when given); the panel is
  // aria-busy meanwhile.
  async function reloadUsage(prepare) {
    const serial = ++usage.serial;
    const panel = $("usage-panel");
    panel.setAttribute("aria-busy", "true");
    $("usage-status").textContent = "Loading usage…";
    try {
      if (typeof prepare === "function") await prepare();
      if (serial !== usage.serial) return;
      await loadUsage(serial);
    } catch (err) {
      if (serial !== usage.serial || !state.key) return;
      $("usage-status").textContent = "";
      $("usage-content").hidden = true;
      $("usage-empty").hidden = true;
      $("usage-calls").hidden = true;
      showError(err);
    } finally {
      if (serial === usage.serial) panel.removeAttribute("aria-busy");
    }
  }

  async function loadUsage(serial) {
    const choice = usageWindow();
    const [totals, series, tools, keys, calls] = await Promise.all([
      api("GET", usagePath("usage", usageParams())),
      api("GET", usagePath("usage", usageParams({ group_by: choice.unit }))),
      api("GET", usagePath("usage", usageParams({ group_by: "server,tool" }))),
      api("GET", usagePath("usage", usageParams({ group_by: "key" }))),
      api("GET", usagePath("calls", { ...usageFilters(), limit: CALLS_PAGE })),
    ]);
    if (serial !== usage.serial) return; // a newer choice is on its way
    $("page-error").textContent = "";
    for (const row of tools.rows) if (row.tool !== null) usage.tools.add(row.tool);
    fillUsageTools();
    const total = totals.rows[0] || { requests: 0, errors: 0, p50_ms: null, p95_ms: null };
    $("usage-status").textContent = windowText(series, choice);
    renderUsageEmpty(total.requests === 0, choice);
    renderTotals(total);
    renderSeries(series, choice);
    renderTopTools(tools.rows);
    renderTopKeys(keys.rows);
    renderCalls(calls, { append: false });
  }

  // The window as the API answered it: from its first hour to the end of its last one.
  function windowText(answer, choice) {
    const from = Date.parse(answer.from);
    const to = Date.parse(answer.to);
    if (choice.unit === "hour") {
      return `Usage in ${choice.text}: ${hourLong.format(from)} to ${hourLong.format(to)} UTC.`;
    }
    return `Usage in ${choice.text}: ${dayLong.format(from)} to ${dayLong.format(to - 1)} ` +
      "(UTC days).";
  }

  function renderUsageEmpty(empty, choice) {
    $("usage-empty").hidden = !empty;
    $("usage-content").hidden = empty;
    if (!empty) return;
    const filtered = Object.keys(usageFilters()).length > 0;
    const whose = state.admin ? "the workspace's keys" : "your keys";
    $("usage-empty-title").textContent = filtered
      ? `No usage matches these filters in ${choice.text}.`
      : `No usage in ${choice.text} yet.`;
    $("usage-empty-text").textContent = filtered
      ? "Pick “All …” in a filter above, or a longer window."
      : `Requests made with ${whose} to MCP servers or the chat API show up here a few ` +
        "seconds after they are made.";
  }

  function renderTotals(total) {
    const rate = total.requests ? ` (${percentFormat.format(total.errors / total.requests)})` : "";
    const stat = (label, value, note = "") =>
      el("div", { class: "stat" }, el("dt", {}, label),
        el("dd", {}, value, note ? el("span", { class: "stat-note" }, note) : null));
    $("usage-totals").replaceChildren(
      stat("Requests", countFormat.format(total.requests)),
      stat("Errors", countFormat.format(total.errors), rate),
      stat("Median duration", msText(total.p50_ms), total.p50_ms === null ? "" : " ms"),
      stat("95th percentile", msText(total.p95_ms), total.p95_ms === null ? "" : " ms"),
    );
  }

  // --- the chart: one group per day (or hour), OK stacked under errors, as inline SVG ---

  // Every bucket of the window, those without requests included.
  function buckets(answer, choice) {
    const counts = new Map();
    for (const row of answer.rows) {
      const at = choice.unit === "day" ? Date.parse(`${row.day}T00:00:00Z`) : Date.parse(row.hour);
      counts.set(at, row);
    }
    const list = [];
    const end = Date.parse(answer.to);
    for (let at = Date.parse(answer.from); at < end; at += choice.step) {
      const row = counts.get(at) || { requests: 0, errors: 0 };
      const id = new Date(at).toISOString();
      list.push({
        at,
        id: choice.unit === "day" ? id.slice(0, 10) : id.replace(".000Z", "Z"),
        requests: row.requests,
        errors: row.errors,
        label: (choice.unit === "day" ? dayLabel : hourLabel).format(at),
        long: choice.unit === "day" ? dayLong.format(at) : `${hourLong.format(at)} UTC`,
      });
    }
    return list;
  }

  function renderSeries(answer, choice) {
    const list = buckets(answer, choice);
    const per = choice.unit === "day" ? "day" : "hour";
    $("usage-chart-title").textContent = `Requests per ${per}`;
    $("usage-chart-name").textContent = `Requests per ${per}, ${choice.text}`;
    $("usage-chart-desc").textContent = chartSummary(list, choice);
    $("usage-series-summary").textContent = `Requests per ${per} as a table`;
    $("usage-series-unit").textContent = choice.unit === "day" ? "Day (UTC)" : "Hour (UTC)";
    $("usage-series-caption").textContent = `Requests per ${per}, ${choice.text}`;
    const num = (n) => el("td", { class: "num" }, countFormat.format(n));
    $("usage-series-table").tBodies[0].replaceChildren(
      ...list.map((b) =>
        el("tr", {}, el("th", { scope: "row" }, b.long), num(b.requests),
          num(b.requests - b.errors), num(b.errors)),
      ),
    );
    usage.chart = { buckets: list, unit: choice.unit, width: 0 };
    drawChart();
  }

  function chartSummary(list, choice) {
    const requests = list.reduce((sum, b) => sum + b.requests, 0);
    const errors = list.reduce((sum, b) => sum + b.errors, 0);
    const busiest = list.reduce((best, b) => (b.requests > best.requests ? b : best), list[0]);
    const unit = choice.unit === "day" ? "day" : "hour";
    return `${plural(requests, "request")} in ${choice.text}, ${plural(errors, "error")}. ` +
      `Busiest ${unit}: ${busiest.long}, ${plural(busiest.requests, "request")}. ` +
      `Every ${unit} is in the table after the chart.`;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  // A round top for the axis, and its step: 1, 2 or 5 times a power of ten, about 4 lines.
  function axisScale(max) {
    const raw = Math.max(1, max / 4);
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
    return { step, top: Math.max(step, step * Math.ceil(max / step)) };
  }

  const chartWidth = () => Math.round($("usage-chart-box").clientWidth);

  // Drawn in the box's own pixels (the viewBox is its width), so text stays 12 px at any size;
  // the SVG also scales with its viewBox until the next draw.
  function drawChart() {
    const chart = usage.chart;
    if (!chart) return;
    const width = Math.max(chartWidth() || 640, 240);
    chart.width = width;
    const height = width < 560 ? 200 : 240;
    const { step, top } = axisScale(Math.max(...chart.buckets.map((b) => b.requests)));
    const left = 14 + 7 * countFormat.format(top).length;
    const box = { left, right: width - 6, top: 10, bottom: height - 26 };
    const plot = box.bottom - box.top;
    const y = (value) => box.bottom - (value / top) * plot;
    const parts = [];
    for (let value = 0; value <= top; value += step) {
      parts.push(
        svg("line", { class: value ? "grid" : "axis", x1: left, x2: box.right, y1: y(value),
          y2: y(value) }),
        svg("text", { class: "tick", x: left - 6, y: y(value) + 4, "text-anchor": "end" },
          countFormat.format(value)),
      );
    }
    const band = (box.right - left) / chart.buckets.length;
    const barWidth = Math.max(1, Math.min(band * 0.7, 48));
    const every = Math.max(1, Math.ceil((chart.unit === "day" ? 52 : 42) / band));
    chart.buckets.forEach((bucket, index) => {
      const x = left + index * band + (band - barWidth) / 2;
      const ok = ((bucket.requests - bucket.errors) / top) * plot;
      const bad = (bucket.errors / top) * plot;
      const labelled = (chart.buckets.length - 1 - index) % every === 0;
      parts.push(
        svg(
          "g",
          { class: "bar", "data-bucket": bucket.id, "data-requests": bucket.requests,
            "data-errors": bucket.errors },
          svg("title", {}, `${bucket.long}: ${plural(bucket.requests, "request")}, ` +
            plural(bucket.errors, "error")),
          svg("rect", { class: "bar-ok", x, y: box.bottom - ok, width: barWidth, height: ok }),
          svg("rect", { class: "bar-error", x, y: box.bottom - ok - bad, width: barWidth,
            height: bad }),
          labelled
            ? svg("text", { class: "label", x: x + barWidth / 2, y: height - 8,
              "text-anchor": "middle" }, bucket.label)
            : null,
        ),
      );
    });
    const node = $("usage-chart");
    node.setAttribute("viewBox", `0 0 ${width} ${height}`);
    node.replaceChildren($("usage-chart-name"), $("usage-chart-desc"), ...parts);
  }

  // Redraws once per frame at most, after the box changed width (never inside the observer).
  function onChartResize() {
    if (!usage.chart || usage.redraw) return;
    usage.redraw = true;
    requestAnimationFrame(() => {
      usage.redraw = false;
      const width = chartWidth();
      if (usage.chart && width > 0 && width !== usage.chart.width) drawChart();
    });
  }

  // --- top tools and top keys ---

  const byRequests = (a, b) => b.requests - a.requests || b.errors - a.errors;

  function metricCells(row) {
    const num = (text) => el("td", { class: "num" }, text);
    return [
      num(countFormat.format(row.requests)),
      num(countFormat.format(row.errors)),
      num(msText(row.p50_ms)),
      num(msText(row.p95_ms)),
    ];
  }

  function renderTopTools(rows) {
    const top = rows.filter((r) => r.tool !== null).sort(byRequests).slice(0, TOP_ROWS);
    $("usage-tools-table").tBodies[0].replaceChildren(
      ...top.map((row) => {
        const server = row.server ? el("span", { class: "session-key" }, row.server) : null;
        const name = el("td", {}, el("span", { class: "key-name" }, row.tool), server);
        return el("tr", { "data-tool": row.tool }, name, ...metricCells(row));
      }),
    );
    $("usage-tools-table").parentElement.hidden = top.length === 0;
    $("usage-tools-none").hidden = top.length > 0;
  }

  function renderTopKeys(rows) {
    const top = [...rows].sort(byRequests).slice(0, TOP_ROWS);
    $("usage-keys-table").tBodies[0].replaceChildren(
      ...top.map((row) => el("tr", { "data-key-id": row.key_id }, usageKeyCell(row.key_id),
        ...metricCells(row))),
    );
  }

  function usageKeyCell(keyId) {
    const key = usageKey(keyId);
    if (!key) return el("td", {}, el("code", { class: "prefix" }, keyId));
    const notes = [
      key.status === "revoked" ? "revoked" : "",
      state.admin && key.user ? key.user.email : "",
    ].filter(Boolean);
    const note = notes.length
      ? el("span", { class: "session-key" }, emailText(notes.join(" · ")))
      : null;
    return el("td", {}, el("span", { class: "key-name" }, key.name), note);
  }

  // --- recent calls ---

  function renderCalls(page, { append }) {
    const rows = page.calls.map(callRow);
    const body = $("usage-calls-table").tBodies[0];
    if (append) body.append(...rows);
    else body.replaceChildren(...rows);
    usage.callsBefore = page.next_before;
    $("usage-calls-more").hidden = page.next_before === null;
    $("usage-calls").hidden = body.rows.length === 0;
  }

  function callRow(call) {
    const key = usageKey(call.key_id);
    const status = el("span", { class: `badge badge-${call.status >= 400 ? "error" : "ok"}` },
      String(call.status));
    const none = () => el("span", { class: "muted none" }, "—");
    const cells = [
      ["Time", timeCell(call.time, callTimeFormat.format(new Date(call.time)))],
      ["Key", key ? key.name : el("code", { class: "prefix" }, call.key_id)],
      ["Server", call.server || el("span", { class: "muted" }, call.route)],
      ["Method", call.mcp_method ? el("code", {}, call.mcp_method) : none()],
      ["Tool", call.tool || none()],
      ["Status", status],
      ["Duration", `${msText(call.duration_ms)} ms`],
    ];
    return tableRow({ "data-call-id": call.id }, cells);
  }

  // The button stays enabled (a disabled one would drop the keyboard focus); a second press
  // while a page is on its way does nothing.
  async function loadMoreCalls() {
    const serial = usage.serial;
    const button = $("usage-calls-more");
    if (button.getAttribute("aria-busy") === "true") return;
    button.setAttribute("aria-busy", "true");
    try {
      const params = { ...usageFilters(), limit: CALLS_PAGE, before: usage.callsBefore };
      const page = await api("GET", usagePath("calls", params));
      if (serial !== usage.serial) return;
      const first = page.calls.length ? page.calls[0].id : null;
      renderCalls(page, { append: true });
      // Focus stays near: on "Load more", or on the first new row's time once it is gone.
      const row = first === null ? null : $("usage-calls-table").querySelector(
        `tr[data-call-id="${first}"] time`);
      if (button.hidden && row) {
        row.tabIndex = -1;
        row.focus();
      }
    } catch (err) {
      if (state.key) showError(err);
    } finally {
      button.removeAttribute("aria-busy");
    }
  }

  // --- CSV: the chart's rows with the filters chosen, fetched with the key, saved from a Blob ---

  async function downloadUsageCsv() {
    const button = $("usage-csv");
    const choice = usageWindow();
    button.disabled = true;
    try {
      const path = usagePath("usage", usageParams({ group_by: choice.unit, format: "csv" }));
      const blob = await apiFile(path, "text/csv");
      const day = new Date(windowStart(choice)).toISOString().slice(0, 10);
      const name = `keystile-usage-${day}-per-${choice.unit}.csv`;
      const link = el("a", { href: URL.createObjectURL(blob), download: name, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
      notify(`Downloaded ${name}.`);
    } catch (err) {
      if (state.key) showError(err);
    } finally {
      button.disabled = false;
    }
  }

  function resetUsage() {
    Object.assign(usage, { keys: [], chart: null, callsBefore: null });
    usage.tools.clear();
    usage.serial += 1;
    $("usage-chart").replaceChildren($("usage-chart-name"), $("usage-chart-desc"));
    $("usage-chart-desc").textContent = "";
    $("usage-totals").replaceChildren();
    for (const id of ["usage-user", "usage-key", "usage-server", "usage-tool"]) {
      $(id).replaceChildren();
    }
    $("usage-window").value = "7d";
    $("usage-status").textContent = "";
    $("usage-content").hidden = true;
    $("usage-empty").hidden = true;
    $("usage-calls").hidden = true;
  }

  // --- tabs ---

  // The heading of the panel on screen: where focus goes when its target is gone.
  function panelTitle() {
    const panel = [...document.querySelectorAll('[role="tabpanel"]')].find((p) => !p.hidden);
    return panel ? panel.querySelector("h1") : $("keys-title");
  }

  function selectTab(name) {
    for (const tab of $("tabs").querySelectorAll('[role="tab"]')) {
      const selected = tab.id === `tab-${name}`;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(tab.getAttribute("aria-controls")).hidden = !selected;
    }
  }

  function onTabKey(event) {
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
    const tabs = [...$("tabs").querySelectorAll('[role="tab"]')].filter((tab) => !tab.hidden);
    const step = event.key === "ArrowRight" ? 1 : -1;
    const next = tabs[(tabs.indexOf(event.target) + step + tabs.length) % tabs.length];
    next.focus();
    next.click();
  }

  async function showUsersTab() {
    notify("");
    selectTab("users");
    await reloadUsers();
  }

  // --- wiring ---

  function init() {
    $("sign-in-form").addEventListener("submit", submitSignIn);
    $("sign-out").addEventListener("click", () => signOut());
    $("tab-keys").addEventListener("click", () => {
      notify("");
      selectTab("keys");
    });
    $("tab-users").addEventListener("click", showUsersTab);
    $("tab-usage").addEventListener("click", () => openUsage());
    $("usage-filters").addEventListener("submit", (event) => event.preventDefault());
    $("usage-user").addEventListener("change", () => {
      fillUsageKeys();
      reloadUsage();
    });
    for (const id of ["usage-window", "usage-key", "usage-server", "usage-tool"]) {
      $(id).addEventListener("change", reloadUsage);
    }
    $("usage-csv").addEventListener("click", downloadUsageCsv);
    $("usage-calls-more").addEventListener("click", loadMoreCalls);
    new ResizeObserver(onChartResize).observe($("usage-chart-box"));
    $("tabs").addEventListener("keydown", onTabKey);
    $("filter-user").addEventListener("change", reloadKeys);
    $("filter-status").addEventListener("change", reloadKeys);
    $("key-filters").addEventListener("submit", (event) => event.preventDefault());
    $("create-key").addEventListener("click", () => openKeyDialog());
    $("key-form").addEventListener("submit", submitKey);
    $("key-form").addEventListener("change", syncKeyDialog);
    $("rotate-form").addEventListener("submit", submitRotate);
    $("copy-key").addEventListener("click", copyKey);
    $("reveal-dialog").addEventListener("close", () => {
      $("reveal-slot").replaceChildren();
      $("copy-status").textContent = "";
    });
    $("confirm-form").addEventListener("submit", submitConfirm);
    for (const dialog of document.querySelectorAll("dialog")) {
      dialog.addEventListener("close", onDialogClosed);
    }
    $("add-user").addEventListener("click", openAddUser);
    $("user-form").addEventListener("submit", submitUser);
    $("grants-form").addEventListener("submit", submitGrants);
    $("grants-form").addEventListener("change", () => syncServerPicker($("grant-servers")));
    $("tools-form").addEventListener("submit", submitUserTools);
    document.addEventListener("click", (event) => {
      const closer = event.target.closest("[data-close]");
      if (closer) closer.closest("dialog").close();
    });

    const saved = sessionStorage.getItem(STORAGE_KEY);
    if (!saved) {
      $("sign-in-key").focus();
      return;
    }
    $("sign-in-view").hidden = true;
    signIn(saved).catch((err) => signOut(`Please sign in again: ${err.message}`));
  }

  init();
})();
