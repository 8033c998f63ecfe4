// The gateway's API with a bearer token, and its event stream read with fetch (EventSource
// cannot send an Authorization header, and the token must stay out of URLs).

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export class Api {
  constructor(token) { this.token = token; }

  async call(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${this.token}`,
                 ...(body ? { "Content-Type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    let answer = {};
    try { answer = await response.json(); } catch { /* not JSON */ }
    if (!response.ok || answer.success === false) {
      throw new ApiError(response.status, answer.error || `HTTP ${response.status}`);
    }
    return answer;
  }

  me() { return this.call("GET", "/me"); }
  status() { return this.call("GET", "/runner/status"); }
  strategies() { return this.call("GET", "/strategies"); }
  hosts() { return this.call("GET", "/admin/hosts"); }
  users() { return this.call("GET", "/admin/users"); }
  start(body) { return this.call("POST", "/runner/start", body); }
  stop(workerId, flatten) {
    return this.call("POST", "/runner/stop", { workerId, flattenPositions: flatten });
  }

  // Calls onEvent({position, type, envelope}) for every event from now on (or after `after`),
  // and onState(true|false) as the stream connects and drops; reconnects after the last id
  // received, so no event is missed or seen twice. Returns a function that ends it.
  events({ after = null, onEvent, onState }) {
    let last = after, stopped = false, controller = null, pause = 500;
    const run = async () => {
      while (!stopped) {
        controller = new AbortController();
        try {
          const headers = { Authorization: `Bearer ${this.token}` };
          if (last !== null) headers["Last-Event-ID"] = String(last);
          const response = await fetch("/events", { headers, signal: controller.signal });
          if (response.status === 401 || response.status === 403) {
            throw new ApiError(response.status, "not allowed");
          }
          if (!response.ok) throw new Error(`HTTP ${response.status}`);
          onState(true);
          pause = 500;
          for await (const message of sse(response.body)) {
            if (message.event === "dropped" || message.event === "error") break;
            if (message.id === null) continue;
            last = Number(message.id);
            onEvent({ position: last, type: message.event, envelope: JSON.parse(message.data) });
          }
        } catch (error) {
          if (error instanceof ApiError) { onState(false); return; }
        }
        onState(false);
        if (!stopped) {
          await new Promise((resolve) => setTimeout(resolve, pause));
          pause = Math.min(pause * 2, 5000);
        }
      }
    };
    run();
    return () => { stopped = true; controller?.abort(); };
  }
}

// Server-sent events from a byte stream: {id, event, data} for each dispatched event.
async function* sse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", event = "", data = [], id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (data.length) yield { id, event: event || "message", data: data.join("\n") };
        event = ""; data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "event") event = value;
        else if (name === "data") data.push(value);
        else if (name === "id") id = value;
      }
    }
  }
}
