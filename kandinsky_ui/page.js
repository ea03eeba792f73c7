() => {
  // The page's own behaviour in the browser, installed once at load (kandinsky_ui/layout.py): the action bar
  // (Generate clicks the selected tab's own Generate, which carries the task's API event; it becomes Stop while
  // this browser's job runs; Ctrl+Enter), the job's progress in the browser tab's title, an opt-in
  // notification when a job ends, and Settings closed on a phone. "Busy" is read from the progress line's
  // data-state (kandinsky_ui/render.py progress_html), which the server's updates set.
  if (window.ksPage) return;
  const BUSY = new Set(["running", "queued", "loading"]);
  const ENDED = {done: "Done", failed: "Failed", stopped: "Stopped"};
  const TASKS = ["text2img", "img2img", "inpaint", "interpolate", "controlnet"];
  const SENT_WINDOW_MS = 5000;   // a click sent, no answer yet: a second one is refused meanwhile
  const SWAP_GUARD_MS = 600;     // a double click on Generate must not land on the Stop that replaced it
  const baseTitle = document.title;
  let lastTask = "text2img", lastState = null, sentAt = 0, guardUntil = 0;

  const line = () => document.querySelector("#progress .ks-progress");
  const state = () => (line() ? line().dataset.state : "idle");
  const sending = () => Date.now() - sentAt < SENT_WINDOW_MS;
  const busy = () => BUSY.has(state()) || sending();

  const noteBox = () => {
    let box = document.getElementById("ks-note");
    const bar = document.getElementById("action-bar");
    if (!box && bar) {
      box = document.createElement("div");
      box.id = "ks-note";
      box.setAttribute("role", "status");
      box.setAttribute("aria-live", "polite");
      bar.appendChild(box);
    }
    return box;
  };
  const say = (text) => { const box = noteBox(); if (box) box.textContent = text; };

  const currentTask = () => {
    for (const task of TASKS) {
      const panel = document.getElementById("tab-" + task);
      if (panel && panel.offsetParent !== null) { lastTask = task; return task; }
    }
    return lastTask;   // PNG info or Models: the last task tab shown
  };

  const generate = () => {
    const task = currentTask();
    if (busy()) {
      say(sending() && !BUSY.has(state())
        ? "Already sent: your job is starting."
        : "Your job is still running, so this started nothing: press Stop, or wait for it to end " +
          "(its progress is in the browser tab's title).");
      return false;
    }
    const button = document.getElementById("generate-" + task);
    if (!button) return false;
    if (button.disabled) {
      say("This tab is off for the selected model: its note says why.");
      return false;
    }
    say("");
    sentAt = Date.now();
    guardUntil = sentAt + SWAP_GUARD_MS;
    const toasts = document.querySelectorAll(".toast-body").length;
    button.click();
    refresh();
    // a request refused with a message (a toast, no progress) gives Generate back at once; no answer at all,
    // after SENT_WINDOW_MS
    const watch = setInterval(() => {
      if (!sentAt || document.querySelectorAll(".toast-body").length > toasts) { sentAt = 0; clearInterval(watch); }
      refresh();
    }, 200);
    setTimeout(() => { clearInterval(watch); refresh(); }, SENT_WINDOW_MS + 100);
    return true;
  };
  window.ksGenerate = generate;

  const notify = (ended, text) => {
    const box = document.querySelector("#notify input[type=checkbox]");
    if (!box || !box.checked || !("Notification" in window) || Notification.permission !== "granted") return;
    try {
      new Notification(`Kandinsky Studio: ${ended}`, {body: text.slice(0, 200), tag: "kandinsky-studio"});
    } catch (error) {   // e.g. a browser that only shows notifications from a service worker
      say(`Job ${ended.toLowerCase()} (the browser refused a notification: ${error.message})`);
    }
  };

  const refresh = () => {
    const s = state();
    const running = BUSY.has(s);
    const text = ((line() || {}).innerText || "").trim();
    const shown = running || sending();
    document.body.classList.toggle("ks-busy", shown);
    if (running) {
      const bar = document.querySelector("#progress .ks-bar > span");
      const percent = bar ? `${Math.round(parseFloat(bar.style.width) || 0)}% ` : "";
      const eta = (text.match(/ETA ([^·]+)/) || [])[1];
      const waiting = (text.match(/Waiting in line: (\d+)/) || [])[1];
      const what = eta ? `ETA ${eta.trim()}` : waiting ? `#${waiting} in line` : s === "loading" ? "loading" : "starting";
      document.title = `${percent}${what} · ${baseTitle}`;
    } else if (ENDED[s] && BUSY.has(lastState)) {
      document.title = `${ENDED[s]} · ${baseTitle}`;
      notify(ENDED[s], text);
    } else if (!ENDED[s]) {
      document.title = baseTitle;
    }
    lastState = s;
  };

  const watch = () => {
    const target = document.getElementById("progress");
    if (!target) return setTimeout(watch, 200);
    new MutationObserver(() => {
      if (BUSY.has(state()) || ENDED[state()]) sentAt = 0;   // the server answered
      refresh();
    }).observe(target, {subtree: true, childList: true, attributes: true, characterData: true});
    refresh();
  };
  watch();

  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      event.stopPropagation();
      generate();
    }
  }, true);
  document.addEventListener("click", (event) => {
    const target = event.target instanceof Element ? event.target : null;
    if (!target) return;
    if (target.closest("#generate")) {
      generate();
    } else if (target.closest("#stop") && event.detail > 1 && Date.now() < guardUntil) {
      event.stopImmediatePropagation();   // the second click of a double click on Generate (detail: click count)
      event.preventDefault();
    } else if (target.closest("#notify") && target.matches("input[type=checkbox]") && target.checked &&
               "Notification" in window && Notification.permission !== "granted") {
      Notification.requestPermission().then((answer) => {
        if (answer !== "granted") say("Notifications are blocked for this site in the browser's settings.");
      });
    }
  }, true);

  // a phone: Settings start closed, so the action bar, preview and progress fit the first screen
  if (window.matchMedia("(max-width: 720px)").matches) {
    const header = document.querySelector("#settings > button.label-wrap, #settings .label-wrap");
    if (header && header.classList.contains("open")) header.click();
  }
  window.ksPage = true;
}
