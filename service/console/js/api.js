// The console's only way to the service: the public /v1 API, with the key the user signed in with.
//
// The key lives in this tab's sessionStorage only: it is sent as "Authorization: Bearer" and is
// never put in a URL, a cookie or a log line. A 401 (unknown or revoked key) signs the page out.
// Errors are ApiError(status, code, message, param) from the API's {"error": {...}} body.

const KEY = "tailor.console.key";
const ROLE = "tailor.console.role";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get role() { return sessionStorage.getItem(ROLE); },
  signIn(key, role) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(ROLE, role); },
  signOut() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(ROLE); },
};

export class ApiError extends Error {
  constructor(status, code, message, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param || null;
  }
}

const listeners = new Set();
export function onSignedOut(fn) { listeners.add(fn); }

function unauthorized(err) {
  if (err.status === 401 && session.key) {
    session.signOut();
    for (const fn of listeners) fn(err);
  }
  return err;
}

function errorFrom(status, body, fallback) {
  const e = body && typeof body === "object" ? body.error : null;
  if (e && typeof e === "object") return new ApiError(status, String(e.code || "error"), String(e.message || fallback), e.param);
  return new ApiError(status, "http_error", fallback);
}

function headers(extra = {}, key = session.key) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

// fetch a /v1 path: {json} sends a JSON body, {form} a FormData, {query} adds search parameters.
export async function api(method, path, { json, form, query, key } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null) url.searchParams.set(k, v);
  const init = { method, headers: headers(json !== undefined ? { "Content-Type": "application/json" } : {}, key),
                 credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form !== undefined) init.body = form;
  let r;
  try {
    r = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, "network_error", `the service did not answer (${e.message})`);
  }
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json().catch(() => null) : null;
  if (!r.ok) throw unauthorized(errorFrom(r.status, body, `${r.status} ${r.statusText}`));
  return body;
}

// A streamed POST (server-sent events): the Response once its status is OK, for the caller to
// read its body; an error status throws ApiError like api(). signal: an AbortController's.
export async function openStream(path, json, signal) {
  let r;
  try {
    r = await fetch(new URL(path, window.location.origin), {
      method: "POST", headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(json), credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer", signal });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", `the service did not answer (${e.message})`);
  }
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw unauthorized(errorFrom(r.status, body, `${r.status} ${r.statusText}`));
  }
  return r;
}

// A binary download through fetch (the key stays in a header): {blob, filename}.
export async function download(path) {
  const r = await fetch(new URL(path, window.location.origin),
                        { headers: headers(), credentials: "omit", cache: "no-store" });
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw unauthorized(errorFrom(r.status, body, `${r.status} ${r.statusText}`));
  }
  const disposition = r.headers.get("content-disposition") || "";
  const m = /filename="([^"]+)"/.exec(disposition);
  return { blob: await r.blob(), filename: m ? m[1] : "download.bin" };
}

// A multipart upload with progress: onProgress(loaded, total) while the body is sent.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", new URL(path, window.location.origin));
    xhr.withCredentials = false;
    xhr.setRequestHeader("Authorization", `Bearer ${session.key}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : 0));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(xhr.response);
      } else {
        reject(unauthorized(errorFrom(xhr.status, xhr.response, `${xhr.status} ${xhr.statusText}`)));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network_error", "the upload did not reach the service")));
    xhr.send(form);
  });
}

// Service-level endpoints outside /v1 (no key needed): readiness and Prometheus text.
export async function readyz() {
  try {
    const r = await fetch("/readyz", { credentials: "omit", cache: "no-store" });
    return r.status === 200;
  } catch {
    return false;
  }
}

export async function metricsText() {
  const r = await fetch("/metrics", { credentials: "omit", cache: "no-store" });
  if (!r.ok) throw new ApiError(r.status, "metrics_unavailable", `/metrics answered ${r.status}`);
  return r.text();
}

export function enc(segment) { return encodeURIComponent(segment); }
