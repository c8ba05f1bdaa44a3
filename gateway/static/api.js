// The dashboard's one way to the API: api(method, path, options). Every call names its method and path literally
// (tests/gateway/test_dashboard.py reads them and checks each against the app's OpenAPI schema).
// The session is the short-lived token alone, in this tab's sessionStorage; the API key is never kept.

const SESSION_KEY = "caravan.session";
const EXPIRY_MARGIN_MS = 5000;

export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

let onExpired = () => {};

/** Call `handler(message)` when the API refuses the token (expired, revoked): the user has to sign in again. */
export function whenExpired(handler) {
  onExpired = handler;
}

function decodePayload(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return {};
  }
}

/** The session of this tab, or null when there is none or its token has expired. */
export function currentSession() {
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  } catch {
    saved = null;
  }
  if (!saved || typeof saved.token !== "string" || !(saved.expiresAt > Date.now() + EXPIRY_MARGIN_MS)) {
    return null;
  }
  return saved;
}

export function clearSession() {
  sessionStorage.removeItem(SESSION_KEY);
}

/** Exchange an API key for a token and keep the token (only) for this tab. */
export async function signIn(apiKey) {
  const answer = await api("POST", "/v1/auth/token", { body: { api_key: apiKey }, auth: false });
  const claims = decodePayload(answer.access_token); // for display only: the server checks every request
  const session = {
    token: answer.access_token,
    role: answer.role || claims.role || "customer",
    subject: typeof claims.sub === "string" ? claims.sub : "",
    customerId: typeof claims.cid === "string" ? claims.cid : null,
    expiresAt: Date.now() + Number(answer.expires_in) * 1000,
  };
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  return session;
}

/** A path segment: ids come from the API, and are encoded all the same. */
export const seg = (value) => encodeURIComponent(String(value));

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : null;
  if (error) {
    let message = String(error.message ?? "request failed");
    const retry = response.headers.get("Retry-After");
    if (response.status === 429 && retry) message += ` (retry in ${retry} s)`;
    return new ApiError(response.status, String(error.code ?? "error"), message, error.details ?? null);
  }
  return new ApiError(response.status, "http_" + response.status, response.statusText || "request failed");
}

/**
 * Call the API. `body` is sent as JSON; `query` is an object of query parameters (empty ones left out);
 * `raw` returns the Response itself (a stream). Answers other than 2xx throw an ApiError with the API's
 * {code, message, details}; a refused token (401) ends the session.
 */
export async function api(method, path, { body, query, headers = {}, signal, raw = false, auth = true } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && value !== "") params.append(name, String(value));
    }
    const text = params.toString();
    if (text) url += "?" + text;
  }
  const sent = { Accept: "application/json", ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  if (auth) {
    const session = currentSession();
    if (!session) {
      const expired = new ApiError(401, "unauthorized", "Your session has ended: sign in again.");
      onExpired(expired.message);
      throw expired;
    }
    sent.Authorization = `Bearer ${session.token}`;
  }
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `The gateway did not answer: ${err && err.message ? err.message : err}`);
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && auth) {
      clearSession();
      onExpired(`${error.message}: sign in again.`);
    }
    throw error;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}
