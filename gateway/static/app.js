// The dashboard's entry: sign in (an API key exchanged for a token), the views of the token's role, sign out.

import { clearSession, currentSession, signIn, whenExpired } from "./api.js";
import { adminAgentsView, auditView, customersView, killswitchView, statsView } from "./admin.js";
import { agentsView, tasksView, teamsView, usageView } from "./customer.js";
import { attempt, el, fill } from "./dom.js";

const VIEWS = {
  customer: [
    ["agents", "Agents", agentsView],
    ["teams", "Teams", teamsView],
    ["tasks", "Tasks", tasksView],
    ["usage", "Usage", usageView],
  ],
  admin: [
    ["overview", "Overview", statsView],
    ["agents", "Agents", adminAgentsView],
    ["killswitch", "Killswitch", killswitchView],
    ["customers", "Customers", customersView],
    ["audit", "Audit", auditView],
  ],
};

const $ = (id) => document.getElementById(id);
let stopView = () => {};
let expiryTimer = null;

function views(session) {
  return VIEWS[session.role === "admin" ? "admin" : "customer"];
}

function show(name) {
  const session = currentSession();
  if (!session) return signOut("Your session has ended: sign in again.");
  const available = views(session);
  const [key, , view] = available.find(([k]) => k === name) || available[0];
  stopView();
  stopView = () => {};
  for (const button of $("tabs").children) {
    if (button.dataset.view === key) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (location.hash !== `#${key}`) history.replaceState(null, "", `#${key}`);
  const root = $("view");
  root.replaceChildren();
  stopView = view(root, session) || (() => {});
}

function signedIn(session) {
  $("sign-in").hidden = true;
  $("tabs").hidden = false;
  $("who").hidden = false;
  $("who-text").textContent =
    session.role === "admin" ? `admin ${session.subject}` : `customer ${session.customerId || session.subject}`;
  fill(
    $("tabs"),
    views(session).map(([key, label]) => {
      const button = el("button", { type: "button", text: label, "data-view": key });
      button.addEventListener("click", () => show(key));
      return button;
    }),
  );
  clearTimeout(expiryTimer);
  expiryTimer = setTimeout(() => signOut("Your session expired: sign in again."), session.expiresAt - Date.now());
  show(location.hash.slice(1));
}

function signOut(message = "") {
  clearTimeout(expiryTimer);
  clearSession();
  stopView();
  stopView = () => {};
  $("view").replaceChildren();
  $("tabs").replaceChildren();
  $("tabs").hidden = true;
  $("who").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-status").textContent = message;
  $("sign-in-form").elements.api_key.focus();
}

function start() {
  whenExpired((message) => signOut(message));
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  const form = $("sign-in-form");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = form.elements.api_key;
    const status = $("sign-in-status");
    status.textContent = "";
    const session = await attempt(status, () => signIn(key.value.trim()), e.submitter);
    key.value = ""; // the key is not kept, in the page either
    if (session) signedIn(session);
  });
  window.addEventListener("hashchange", () => {
    if (currentSession()) show(location.hash.slice(1));
  });
  const session = currentSession();
  if (session) signedIn(session);
  else signOut();
}

start();
