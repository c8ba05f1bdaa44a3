// Server-sent events read with fetch(), so that the request carries the bearer token in a header (EventSource
// cannot send one, and a token in a URL ends up in logs). The parser follows the HTML standard's rules.

import { api, seg } from "./api.js";

export const FINAL_STATUSES = new Set(["completed", "failed", "cancelled", "killed"]);

/**
 * A parser of a text/event-stream: push() it text as it arrives; it calls dispatch({id, event, data}) for each
 * event. `state.lastEventId` is the id to resume after; `state.retry` the reconnection delay the server asked.
 */
export function sseParser(dispatch) {
  const state = { lastEventId: "", retry: null };
  let buffer = "";
  let data = [];
  let type = "";
  let idBuffer = "";

  function line(text) {
    if (text === "") {
      state.lastEventId = idBuffer;
      if (data.length > 0) dispatch({ id: state.lastEventId, event: type || "message", data: data.join("\n") });
      data = [];
      type = "";
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") type = value;
    else if (field === "id" && !value.includes("\0")) idBuffer = value;
    else if (field === "retry" && /^\d+$/.test(value)) state.retry = Number(value);
  }

  return {
    state,
    push(chunk) {
      buffer += chunk;
      for (;;) {
        const end = buffer.search(/\r\n|\r|\n/);
        if (end < 0) return;
        if (buffer[end] === "\r" && end === buffer.length - 1) return; // its \n may come in the next chunk
        const width = buffer.startsWith("\r\n", end) ? 2 : 1;
        line(buffer.slice(0, end));
        buffer = buffer.slice(end + width);
      }
    },
  };
}

/** Wait `ms`, or less when `signal` aborts; the abort listener goes when the wait ends either way. */
function pause(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const wake = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", wake);
      resolve();
    }, ms);
    signal.addEventListener("abort", wake, { once: true });
  });
}

/**
 * Follow a task's events until its final status, reconnecting with Last-Event-ID when the stream breaks.
 * Calls onEvent(event) with each event's JSON (its `id` included) and onState(text) as the connection changes.
 * Resolves "ended" (final status seen, or 204: nothing more to stream) or "stopped" (signal aborted); rejects
 * with the ApiError of a refusal that reconnecting cannot mend (401, 403, 404, 422).
 */
export async function followTask(taskId, { onEvent, onState, signal }) {
  let lastEventId = "";
  let delay = 1000;
  let failures = 0; // connections in a row that brought no event: each waits longer (up to 30 s)
  const backoff = () => Math.min(delay * 2 ** Math.min(failures, 5), 30000);
  while (!signal.aborted) {
    let response;
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      response = await api("GET", `/v1/tasks/${seg(taskId)}/events`, { raw: true, headers, signal });
    } catch (err) {
      if (signal.aborted) return "stopped";
      if (err.status >= 400 && err.status < 500 && err.status !== 429) throw err;
      failures += 1;
      onState(`disconnected (${err.message}); reconnecting`);
      await pause(backoff(), signal);
      continue;
    }
    if (response.status === 204) return "ended";
    onState("live");
    let ended = false;
    let received = false;
    const parser = sseParser((message) => {
      received = true;
      failures = 0; // the stream works: only an event says so (one may open and close at once, again and again)
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      onEvent(event);
      if (event.kind === "status" && FINAL_STATUSES.has(event.content)) ended = true;
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch {
      if (signal.aborted) return "stopped";
    } finally {
      reader.cancel().catch(() => {}); // the connection goes, whether the stream ended, broke or was left
    }
    if (parser.state.lastEventId) lastEventId = parser.state.lastEventId;
    if (parser.state.retry !== null) delay = parser.state.retry;
    if (ended) return "ended";
    if (signal.aborted) return "stopped";
    if (!received) failures += 1;
    onState("stream closed; reconnecting");
    await pause(received ? delay : backoff(), signal);
  }
  return "stopped";
}
