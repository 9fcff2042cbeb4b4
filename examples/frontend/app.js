// authapp example frontend: register, log in, show the user, list and revoke sessions, log out.
//
// Where the tokens live: in the two variables below and nowhere else. Not localStorage, not
// sessionStorage, not a cookie, not the URL: any script that runs on this origin can read
// storage, at any time and long after the fact, while a variable dies with the tab. The
// price is that a reload logs the user out; see docs/frontend.md.
(function () {
  "use strict";

  const config = window.AUTHAPP_CONFIG || {};
  const API = String(config.apiBaseUrl || "").replace(/\/+$/, "");

  let accessToken = null;
  let refreshToken = null;
  let refreshing = null; // the refresh in flight, shared by every call that needs it
  let pending = 0;

  class ApiError extends Error {
    constructor(status, body, requestId) {
      const envelope = body && typeof body === "object" ? body : {};
      super(envelope.detail || `The API answered ${status}`);
      this.status = status;
      this.code = envelope.error_code || "";
      this.requestId = envelope.request_id || requestId || "";
      this.fields = envelope.errors || null;
    }
  }

  class NetworkError extends Error {}

  const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

  // -- HTTP -------------------------------------------------------------------------------

  async function request(method, path, { body, auth = false } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth) headers.Authorization = `Bearer ${accessToken}`;
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        mode: "cors",
        credentials: "omit", // the tokens travel in the Authorization header, never in cookies
        cache: "no-store",
      });
    } catch (err) {
      // The browser tells a script nothing more: a refused CORS check, a server that is
      // down and a blocked address all look the same from here.
      throw new NetworkError(
        `Could not reach the API at ${API || "(no apiBaseUrl in config.js)"}. Is it running, and does its ` +
          `CORS_ORIGINS list this page's origin (${window.location.origin})?`,
      );
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) throw new ApiError(response.status, data, response.headers.get("X-Request-ID"));
    return data;
  }

  function isExpired(err) {
    return err instanceof ApiError && err.status === 401 && err.code === "TOKEN_EXPIRED";
  }

  function refreshTokens() {
    if (!refreshing) {
      refreshing = request("POST", "/auth/refresh", { body: { refresh_token: refreshToken } })
        .then(
          (pair) => {
            keepTokens(pair);
            notice("Your access token had expired: it was refreshed and the call retried.");
          },
          (err) => {
            // The refresh token is expired, revoked or reused: the session is over.
            if (err instanceof ApiError && err.status === 401) forgetSession();
            throw err;
          },
        )
        .finally(() => {
          refreshing = null;
        });
    }
    return refreshing;
  }

  // A call with the access token. When it answers 401 TOKEN_EXPIRED, refresh the pair once
  // and retry once; any other 401 (revoked, inactive, invalid) means the session is over.
  async function authed(method, path, body) {
    if (!accessToken) throw new ApiError(401, { detail: "You are not logged in", error_code: "MISSING_TOKEN" });
    const sent = accessToken;
    try {
      try {
        return await request(method, path, { body, auth: true });
      } catch (err) {
        if (!isExpired(err) || !refreshToken) throw err;
        // Another call may have refreshed already while this one was on its way.
        if (accessToken === sent) await refreshTokens();
        return await request(method, path, { body, auth: true });
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401 && !isExpired(err)) forgetSession();
      throw err;
    }
  }

  // -- State ------------------------------------------------------------------------------

  function keepTokens(pair) {
    accessToken = pair.access_token;
    refreshToken = pair.refresh_token;
  }

  function forgetSession() {
    accessToken = null;
    refreshToken = null;
    render(null);
  }

  function setBusy(delta) {
    pending += delta;
    $("main").setAttribute("aria-busy", pending > 0 ? "true" : "false");
  }

  // -- Rendering: text only (textContent), never markup built from data -------------------

  function render(user) {
    $("signed-in").hidden = !user;
    $("signed-out").hidden = Boolean(user);
    if (!user) {
      $("sessions").replaceChildren();
      return;
    }
    $("me-username").textContent = user.username;
    $("me-id").textContent = String(user.id);
    $("me-email").textContent = user.email;
    $("me-created-at").textContent = user.created_at;
    $("me-last-login").textContent = user.last_login || "never";
  }

  function renderSessions(sessions) {
    const items = sessions.map((session) => {
      const li = document.createElement("li");
      li.dataset.testid = "session";
      li.dataset.sessionId = session.id;
      li.dataset.current = String(Boolean(session.current));
      const title = document.createElement("div");
      title.textContent = session.user_agent || "unknown browser";
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent =
        `from ${session.ip || "unknown address"} · started ${session.created_at} · ` +
        `last used ${session.last_used_at || "never"} · ends ${session.expires_at}`;
      li.append(title, meta);
      if (session.current) {
        const mark = document.createElement("span");
        mark.className = "current";
        mark.textContent = "this session";
        li.append(mark);
      } else {
        const revoke = document.createElement("button");
        revoke.type = "button";
        revoke.dataset.testid = "revoke-session";
        revoke.textContent = "Revoke";
        revoke.addEventListener("click", () => run(() => revokeSession(session.id)));
        li.append(revoke);
      }
      return li;
    });
    $("sessions").replaceChildren(...items);
  }

  function clearMessages() {
    $("error").hidden = true;
    $("notice").textContent = "";
  }

  function notice(text) {
    $("notice").textContent = text;
  }

  function showError(err) {
    $("error-detail").textContent = err.message;
    $("error-code").textContent = err.code || "";
    $("error-request-id").textContent = err.requestId || "";
    $("error-request-id-line").hidden = !err.requestId;
    const fields = Object.entries(err.fields || {}).map(([field, messages]) => {
      const li = document.createElement("li");
      li.textContent = `${field}: ${[].concat(messages).join(" ")}`;
      return li;
    });
    $("error-fields").replaceChildren(...fields);
    $("error").hidden = false;
  }

  // Every user action: clear the old messages, run, show any failure. <main aria-busy>
  // stays "true" until the action and its rendering are done.
  async function run(action) {
    clearMessages();
    setBusy(+1);
    try {
      await action();
    } catch (err) {
      if (!(err instanceof ApiError || err instanceof NetworkError)) console.error(err);
      showError(err);
    } finally {
      setBusy(-1);
    }
  }

  // -- Actions ----------------------------------------------------------------------------

  async function signIn(pair) {
    keepTokens(pair);
    render(pair.user);
    await loadSessions();
  }

  async function register(form) {
    const data = new FormData(form);
    const pair = await request("POST", "/auth/register", {
      body: { email: data.get("email"), username: data.get("username"), password: data.get("password") },
    });
    form.reset();
    await signIn(pair);
    notice(`Welcome, ${pair.user.username}: your account is ready.`);
  }

  async function login(form) {
    const data = new FormData(form);
    const identifier = String(data.get("identifier")).trim();
    const body = identifier.includes("@") ? { email: identifier } : { username: identifier };
    body.password = data.get("password");
    const pair = await request("POST", "/auth/login", { body });
    form.reset();
    await signIn(pair);
  }

  async function loadMe() {
    render(await authed("GET", "/auth/me"));
  }

  async function loadSessions() {
    const body = await authed("GET", "/auth/sessions");
    renderSessions(body.sessions);
  }

  async function reload() {
    // In parallel on purpose: when the access token has expired both calls get 401, and
    // the pair is still refreshed only once.
    const results = await Promise.allSettled([loadMe(), loadSessions()]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
  }

  async function revokeSession(id) {
    await authed("DELETE", `/auth/sessions/${encodeURIComponent(id)}`);
    await loadSessions();
    notice("The session was revoked.");
  }

  async function logout() {
    try {
      await authed("POST", "/auth/logout", { refresh_token: refreshToken });
    } finally {
      forgetSession(); // logged out here even when the API could not be told
    }
    notice("You are logged out.");
  }

  // -- Wiring -----------------------------------------------------------------------------

  $("api-base").textContent = API || "(set apiBaseUrl in config.js)";
  $("page-origin").textContent = window.location.origin;
  $("register-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => register(event.target));
  });
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => login(event.target));
  });
  $("reload").addEventListener("click", () => run(reload));
  $("logout").addEventListener("click", () => run(logout));
  render(null);
  document.documentElement.dataset.ready = "true";
})();
