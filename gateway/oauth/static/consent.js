// Keystile consent page: one authorization request, decided with a key kept in memory only.
// The key goes in a POST body, never a URL, cookie or storage; the page follows the redirect
// the server answers with (the client's, with its code or error and its state).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const request = $("request").value;
  const keyInput = $("api-key");
  const errorBox = $("error");
  let key = "";

  async function post(body) {
    const response = await fetch("authorize", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ request, ...body }),
      credentials: "omit",
      cache: "no-store",
    });
    let answer = {};
    try {
      answer = await response.json();
    } catch (_) {
      answer = { message: `Unexpected answer (HTTP ${response.status}).` };
    }
    if (!response.ok) {
      throw new Error(answer.message || answer.error_description || "The request failed.");
    }
    return answer;
  }

  function busy(form, on) {
    for (const button of form.querySelectorAll("button")) button.disabled = on;
  }

  function fail(error, focus) {
    errorBox.textContent = error.message;
    if (focus) focus.focus();
  }

  function follow(answer) {
    key = "";
    keyInput.value = "";
    window.location.assign(answer.redirect);
  }

  function toolRow(tool) {
    const id = `tool-${tool.name}`;
    const row = document.createElement("div");
    row.className = "tool";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = id;
    box.value = tool.name;
    const text = document.createElement("div");
    const label = document.createElement("label");
    label.htmlFor = id;
    label.className = "mono";
    label.textContent = tool.name;
    text.append(label);
    if (tool.description) {
      // Described, not labelled: the checkbox is named by the tool alone.
      const description = document.createElement("span");
      description.id = `${id}-description`;
      description.className = "description";
      description.textContent = tool.description;
      box.setAttribute("aria-describedby", description.id);
      text.append(description);
    }
    row.append(box, text);
    return row;
  }

  function showTools(answer) {
    $("signed-in").textContent = `Approving as ${answer.user}.`;
    const list = $("tool-list");
    const note = $("tools-note");
    list.replaceChildren(...(answer.tools || []).map(toolRow));
    const some = $("scope-some");
    if (answer.tools === null) {
      some.disabled = true;
      note.textContent = "The server's tools could not be listed now; you can allow every tool this key allows.";
      note.hidden = false;
    } else if (answer.tools.length === 0) {
      some.disabled = true;
      note.textContent = "This key allows no tool of this server.";
      note.hidden = false;
    }
    $("sign-in").hidden = true;
    $("decide").hidden = false;
    $("title").focus();
  }

  function chosenTools() {
    if (!$("scope-some").checked) return null;
    return [...$("tool-list").querySelectorAll("input:checked")].map((box) => box.value);
  }

  $("sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    errorBox.textContent = "";
    keyInput.removeAttribute("aria-invalid");
    if (!keyInput.value.trim()) {
      keyInput.setAttribute("aria-invalid", "true");
      fail(new Error("Paste an API key first."), keyInput);
      return;
    }
    busy(event.target, true);
    try {
      const candidate = keyInput.value.trim();
      const answer = await post({ action: "sign_in", key: candidate });
      key = candidate;
      keyInput.value = "";
      showTools(answer);
    } catch (error) {
      keyInput.setAttribute("aria-invalid", "true");
      fail(error, keyInput);
    } finally {
      busy(event.target, false);
    }
  });

  for (const radio of document.querySelectorAll('input[name="scope"]')) {
    radio.addEventListener("change", () => {
      $("tool-list").hidden = !$("scope-some").checked;
    });
  }

  $("decide").addEventListener("submit", async (event) => {
    event.preventDefault();
    errorBox.textContent = "";
    const tools = chosenTools();
    if (tools !== null && tools.length === 0) {
      fail(new Error("Choose at least one tool, or allow every tool."), $("scope-some"));
      return;
    }
    busy(event.target, true);
    try {
      follow(await post({ action: "allow", key, tools }));
    } catch (error) {
      fail(error, $("allow"));
      busy(event.target, false);
    }
  });

  for (const button of document.querySelectorAll("button.deny")) {
    button.addEventListener("click", async () => {
      errorBox.textContent = "";
      busy(button.form, true);
      try {
        follow(await post({ action: "deny" }));
      } catch (error) {
        fail(error, button);
        busy(button.form, false);
      }
    });
  }
})();
