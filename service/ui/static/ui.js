// Outbox Relay dashboard: the little JavaScript the pages use. No framework, no build step.
// Everything here is an enhancement: the pages work without it (times then stay in UTC).
"use strict";

(function () {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
    hour12: false, timeZoneName: "short",
  });

  function localTime(iso) {
    const when = new Date(iso);
    return isNaN(when) ? iso : format.format(when);
  }

  // <time datetime="...Z"> elements: shown in the browser's zone, UTC kept in the tooltip
  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      el.textContent = localTime(el.getAttribute("datetime"));
      el.dataset.local = "1";
    });
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  // "YYYY-MM-DDTHH:MM:SS" in the browser's zone, for <input type="datetime-local">
  function toLocalInput(iso) {
    const d = new Date(iso);
    if (isNaN(d)) return "";
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // Time-range filters: the visible field is local time; the hidden one sent is UTC ISO 8601.
  function wireTimeFilters() {
    const form = document.getElementById("filters");
    if (!form) return;
    const pairs = [];
    form.querySelectorAll("input[data-utc]").forEach((visible) => {
      const hidden = form.querySelector(`input[type=hidden][name="${visible.dataset.utc}"]`);
      if (!hidden) return;
      visible.value = hidden.value ? toLocalInput(hidden.value) : "";
      pairs.push([visible, hidden]);
    });
    form.addEventListener("submit", () => {
      for (const [visible, hidden] of pairs) {
        const d = visible.value ? new Date(visible.value) : null;  // parsed as local time
        hidden.value = d && !isNaN(d) ? d.toISOString() : "";
        visible.disabled = true;  // send only the UTC value
      }
      // empty fields need not clutter the URL
      form.querySelectorAll("input, select").forEach((el) => {
        if (!el.value && el.name) el.disabled = true;
      });
    });
    window.addEventListener("pageshow", () => {
      form.querySelectorAll("input, select").forEach((el) => { el.disabled = false; });
    });
  }

  function wireSelection() {
    const form = document.getElementById("bulk");
    if (!form) return;
    const all = document.getElementById("select-all");
    const boxes = () => Array.from(form.querySelectorAll("input[name=ids]"));
    const counter = document.getElementById("selected-count");
    const needers = form.querySelectorAll("[data-needs-selection]");
    function update() {
      const n = boxes().filter((b) => b.checked).length;
      if (counter) counter.textContent = `${n} selected`;
      needers.forEach((b) => { b.disabled = n === 0; });
      if (all) {
        all.checked = n > 0 && n === boxes().length;
        all.indeterminate = n > 0 && n < boxes().length;
      }
    }
    if (all) all.addEventListener("change", () => { boxes().forEach((b) => { b.checked = all.checked; }); update(); });
    form.addEventListener("change", (e) => { if (e.target.name === "ids") update(); });
    update();
  }

  // Buttons with data-confirm ask first.
  function wireConfirms() {
    document.addEventListener("click", (e) => {
      const button = e.target.closest("[data-confirm]");
      if (button && !window.confirm(button.dataset.confirm)) e.preventDefault();
    });
  }

  // The job page follows the job until it ends.
  function followJob() {
    const box = document.getElementById("job");
    if (!box) return;
    const id = box.dataset.job;
    const bar = document.getElementById("job-progress");
    const fields = {};
    box.querySelectorAll("[data-field]").forEach((el) => { fields[el.dataset.field] = el; });
    const number = (n) => Number(n).toLocaleString();
    function show(job) {
      const done = job.total - job.remaining;
      box.dataset.status = job.status;
      fields.status.textContent = job.status;
      fields.status.className = `badge job-${job.status}`;
      for (const name of ["replayed", "failed", "skipped", "total"]) fields[name].textContent = number(job[name]);
      fields.done.textContent = number(done);
      bar.max = job.total || 1;
      bar.value = job.total ? done : 1;
      for (const name of ["started_at", "finished_at"]) {
        if (job[name]) {
          const t = document.createElement("time");
          t.setAttribute("datetime", job[name]);
          t.textContent = localTime(job[name]);
          fields[name].replaceChildren(t);
        }
      }
      fields.error.hidden = !job.error;
      fields.error.textContent = job.error || "";
    }
    let delay = 400;
    async function poll() {
      if (!["queued", "running"].includes(box.dataset.status)) return;
      try {
        const r = await fetch(`/ui/jobs/${id}/progress`, { headers: { Accept: "application/json" }, credentials: "same-origin" });
        if (r.status === 401 || r.redirected) { window.location.reload(); return; }
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        show(await r.json());
        delay = 400;
      } catch (err) {
        fields.error.hidden = false;
        fields.error.textContent = `Could not fetch the job's progress (${err.message}); retrying…`;
        delay = Math.min(delay * 2, 5000);
      }
      setTimeout(poll, delay);
    }
    setTimeout(poll, delay);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const tz = document.getElementById("tz");
    if (tz) tz.textContent = zone;
    localizeTimes(document);
    wireTimeFilters();
    wireSelection();
    wireConfirms();
    followJob();
  });
})();
