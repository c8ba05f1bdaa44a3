// One task, watched live: its events as they come (resumed after a break), the human's answer when the task
// asks for one, cancel.

import { api, seg } from "./api.js";
import { attempt, badge, el, fill, showError, when } from "./dom.js";
import { FINAL_STATUSES, followTask } from "./sse.js";

function describe(event) {
  const data = event.data || {};
  switch (event.kind) {
    case "status":
      return `status: ${event.content}${data.reason ? ` (${data.reason})` : ""}`;
    case "tool_call":
      return (data.calls || []).map((c) => `calls ${c.name}(${typeof c.arguments === "string" ? c.arguments : JSON.stringify(c.arguments)})`).join("\n");
    case "tool_result":
      return (data.results || []).map((r) => `${r.is_error ? "tool error" : "tool result"}: ${r.content}`).join("\n");
    case "usage":
      return `tokens: ${data.prompt_tokens ?? 0} prompt, ${data.completion_tokens ?? 0} completion${data.replayed ? " (replayed)" : ""}`;
    default:
      if (event.content !== null && event.content !== undefined) {
        return typeof event.content === "string" ? event.content : JSON.stringify(event.content);
      }
      return Object.keys(data).length ? JSON.stringify(data) : "";
  }
}

/** A message of the task's record (its stored transcript) as the event it was. */
function asEvent(message) {
  const { type, content, source, at } = message;
  if (type === "tool_call" && Array.isArray(content)) return { kind: type, source, at, data: { calls: content } };
  if (type === "tool_result" && Array.isArray(content)) return { kind: type, source, at, data: { results: content } };
  if (type === "tool_call" || type === "tool_result" || type === "input_request") return { kind: type, source, at, content };
  return { kind: "message", source, at, content, data: { type } };
}

/**
 * Open task `taskId` in `root`. `onChange(task)` is called with what changed ({id, status}; at the end the whole
 * record) as the view learns it. Returns the function that closes it.
 */
export function openTask(root, taskId, { onClose, onChange } = {}) {
  const controller = new AbortController();
  const errors = el("div"); // loading the task, following its events
  const cancelErrors = el("div"); // Cancel's: kept until it is tried again
  const heading = el("h2", { text: `Task ${taskId}` });
  const status = el("span");
  const connection = el("span", { class: "muted", role: "status" });
  const facts = el("p", { class: "muted" });
  const request = el("pre");
  const transcript = el("ol", { class: "transcript", "aria-live": "polite" });
  const result = el("div");
  const chunks = new Map(); // source -> the list item its streamed pieces accumulate in
  // the tokens: the record's (all the task used when it was read) and those of the usage events streamed so far
  // (from the first); the line shows the larger of the two, so it neither drops to a partial count nor lags
  let recorded = { prompt: 0, completion: 0 };
  const counted = { prompt: 0, completion: 0 };

  const answer = el("textarea", { name: "content", required: true, rows: 3 });
  const answerErrors = el("div");
  const inputForm = el(
    "form",
    { hidden: true, class: "panel" },
    el("label", {}, "The task asks for your answer", answer),
    el("div", {}, el("button", { type: "submit", class: "primary", text: "Send answer" })),
    answerErrors,
  );
  inputForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const sent = await attempt(
      answerErrors,
      // the question it answers: a second click after the team asked again is refused, not the next answer
      () => api("POST", `/v1/tasks/${seg(taskId)}/input`, { body: { content: answer.value, segment: question } }),
      e.submitter,
    );
    if (sent) {
      answer.value = "";
      inputForm.hidden = true;
    }
  });

  const cancel = el("button", { type: "button", class: "danger", text: "Cancel task" });
  cancel.addEventListener("click", async () => {
    if (!window.confirm("Cancel this task?")) return;
    const task = await attempt(cancelErrors, () => api("POST", `/v1/tasks/${seg(taskId)}/cancel`), cancel);
    if (task) setStatus(task.status, task.status_reason, task.segment);
  });
  const close = el("button", { type: "button", text: "Close" });
  close.addEventListener("click", () => {
    stop();
    if (onClose) onClose();
  });

  // Once the task has ended it stays so: the record follows the event stream by a moment, and an answer read after
  // the final event (the record, or Cancel's answer: the task as it was asked) can still hold an earlier status.
  let ended = null;
  let question; // the segment of the question the form answers (undefined: whichever waits)
  function asked(segment) {
    // questions only come later: a record read late (it follows the event stream) names an earlier one
    if (Number.isInteger(segment) && !(question > segment)) question = segment;
  }
  function setStatus(value, reason, segment) {
    if (ended && !FINAL_STATUSES.has(value)) return;
    if (FINAL_STATUSES.has(value)) ended = value;
    if (onChange) onChange({ id: taskId, status: value });
    fill(status, badge(value), reason ? el("span", { class: "muted", text: ` ${reason}` }) : null);
    cancel.hidden = FINAL_STATUSES.has(value);
    if (value === "awaiting_input") {
      inputForm.hidden = false;
      asked(segment);
    } else if (value === "running" || FINAL_STATUSES.has(value)) inputForm.hidden = true;
  }

  function showFacts(task) {
    const target = task.team_id ? `team ${task.team_id}` : `agent ${task.agent_id}`;
    fill(facts, `${target} · started ${when(task.created_at)} · attempt ${task.attempt}`, task.finished_at ? ` · ended ${when(task.finished_at)}` : "");
    request.textContent = task.task;
    recorded = { prompt: Number(task.usage.prompt_tokens) || 0, completion: Number(task.usage.completion_tokens) || 0 };
    showTokens();
    if (task.result !== null && task.result !== undefined) showResult(task.result);
  }

  const tokenLine = el("p", { class: "muted" });
  function showTokens() {
    const prompt = Math.max(recorded.prompt, counted.prompt);
    const completion = Math.max(recorded.completion, counted.completion);
    tokenLine.textContent = `Tokens: ${prompt} prompt, ${completion} completion`;
  }

  function showResult(text) {
    fill(result, el("h3", { text: "Result" }), el("pre", { text }));
  }

  function add(event) {
    if (event.kind === "chunk") {
      const source = event.source || "";
      let item = chunks.get(source);
      if (!item) {
        item = el("li", { class: "chunk" }, el("div", { class: "meta", text: `${source} (writing…)` }), el("div", { class: "content" }));
        chunks.set(source, item);
        transcript.append(item);
      }
      item.lastChild.textContent += event.content || "";
      return;
    }
    if (event.kind === "message" && chunks.has(event.source || "")) {
      chunks.get(event.source || "").remove();
      chunks.delete(event.source || "");
    }
    if (event.kind === "status") {
      setStatus(event.content, event.data && event.data.reason, event.data && event.data.segment);
    }
    if (event.kind === "input_request") {
      inputForm.hidden = false;
      asked(event.data && event.data.segment);
    }
    if (event.kind === "result" && event.content) showResult(event.content);
    if (event.kind === "usage" && event.data && !event.data.replayed) {
      counted.prompt += Number(event.data.prompt_tokens) || 0;
      counted.completion += Number(event.data.completion_tokens) || 0;
      showTokens();
    }
    entry(event);
  }

  /** The transcript's line of `event`. */
  function entry(event) {
    const meta = [when(event.at), event.source, event.kind === "message" ? null : event.kind].filter(Boolean).join(" · ");
    transcript.append(
      el("li", { class: String(event.kind).replace(/[^a-z_]/g, "") }, el("div", { class: "meta", text: meta }), el("div", { class: "content", text: describe(event) })),
    );
    transcript.scrollTop = transcript.scrollHeight;
  }

  fill(
    root,
    el(
      "section",
      { class: "panel" },
      el("div", { class: "toolbar" }, heading, status, cancel, close),
      facts,
      el("h3", { text: "Task" }),
      request,
      tokenLine,
      cancelErrors,
      errors,
      el("p", {}, "Events: ", connection),
      transcript,
      inputForm,
      result,
    ),
  );

  async function refresh() {
    const task = await attempt(errors, () => api("GET", `/v1/tasks/${seg(taskId)}`));
    if (task) {
      setStatus(task.status, task.status_reason, task.segment);
      showFacts(task);
    }
    return task;
  }

  (async () => {
    const task = await refresh();
    if (!task) return;
    let streamed = false;
    const onEvent = (event) => {
      streamed = true;
      add(event);
    };
    try {
      const how = await followTask(taskId, { onEvent, onState: (text) => (connection.textContent = text), signal: controller.signal });
      if (how === "ended") {
        connection.textContent = "ending";
        let final = (await refresh()) || task;
        // the record has the end a moment after the stream (its time, tokens and result): read it until it does
        for (let wait = 100; !FINAL_STATUSES.has(final.status) && wait <= 3200 && !controller.signal.aborted; wait *= 2) {
          await new Promise((resolve) => setTimeout(resolve, wait));
          final = (await refresh()) || final;
        }
        connection.textContent = "ended";
        if (!streamed) {
          // a finished task whose events are no longer streamed (204 at once): its record keeps the transcript
          connection.textContent = "ended (the transcript as recorded)";
          for (const message of final.messages || []) entry(asEvent(message));
          if (!transcript.firstChild) transcript.append(el("li", { class: "status", text: "No message recorded." }));
        }
        if (onChange && FINAL_STATUSES.has(final.status)) onChange(final);
      }
    } catch (error) {
      connection.textContent = "stopped";
      showError(errors, error);
    }
  })();

  function stop() {
    controller.abort();
  }
  return stop;
}
