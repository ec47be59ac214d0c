// mailhook console: the few things plain HTML cannot do. No inline script anywhere; this file
// is the only one, served by the console itself.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Buttons that ask before acting.
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  }

  // "tick all" on the dead letters.
  for (const all of document.querySelectorAll("input.tick-all")) {
    all.addEventListener("change", () => {
      for (const box of all.form.querySelectorAll("input[name=id]")) box.checked = all.checked;
    });
  }

  // Upload an .eml into the playground's text area (read in the browser, sent as text).
  for (const input of document.querySelectorAll("input[type=file][data-into]")) {
    input.addEventListener("change", () => {
      const file = input.files[0];
      if (!file) return;
      file.text().then((text) => { document.getElementById(input.dataset.into).value = text; });
    });
  }

  // Choosing another rules file shows its text (the edits of the current one are left).
  for (const select of document.querySelectorAll("select[data-reload]")) {
    select.addEventListener("change", () => {
      const params = new URLSearchParams({ file: select.value });
      const id = document.getElementById("id");
      if (id && id.value) params.set("id", id.value);
      window.location.href = "/playground?" + params.toString();
    });
  }

  // The live tail.
  const table = document.getElementById("tail");
  if (table && window.EventSource) {
    const state = document.getElementById("tail-state");
    const source = new EventSource(table.dataset.source);
    source.onopen = () => { state.textContent = "live"; };
    source.onerror = () => { state.textContent = "reconnecting…"; };
    source.onmessage = (message) => {
      const e = JSON.parse(message.data);
      const row = document.createElement("tr");
      const link = document.createElement("a");
      link.href = "/messages/" + encodeURIComponent(e.id);
      link.textContent = e.subject || e.id;
      const detail = e.kind === "attempt"
        ? (e.destination || "") + (e.status ? " HTTP " + e.status : "")
        : (e.from || "") + (e.rule ? " · rule " + e.rule : "");
      for (const text of [e.at, e.kind, e.state, link, detail]) {
        const cell = document.createElement("td");
        if (typeof text === "string") cell.textContent = text; else cell.appendChild(text);
        row.appendChild(cell);
      }
      row.className = "state-" + e.state;
      table.querySelector("tr").after(row);
      while (table.rows.length > 201) table.deleteRow(-1);
    };
  }
});
