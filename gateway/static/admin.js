// The operator's views: statistics (refreshing themselves), every customer's agents, the killswitch, customers
// and their quotas, the audit log. The server checks the admin role on every call; these views only ask.

import { api, seg } from "./api.js";
import { REFRESHES, REFRESH_MS, actionButton, attempt, badge, counted, el, every, field, fill, numberOrNull, showError, showNotice, table, when } from "./dom.js";
import { usageTable } from "./customer.js";

const TIERS = ["free", "standard", "enterprise"];

function counts(title, byStatus) {
  const entries = Object.entries(byStatus || {}).sort(([a], [b]) => a.localeCompare(b));
  const total = entries.reduce((sum, [, n]) => sum + n, 0);
  return el(
    "div",
    { class: "card" },
    el("div", { class: "muted", text: title }),
    el("div", { class: "big", text: String(total) }),
    el("dl", {}, entries.map(([status, n]) => [el("dt", {}, badge(status)), el("dd", { text: String(n) })])),
  );
}

function engagedBanner(flags) {
  if (!flags.length) return el("p", { class: "muted", text: "No killswitch engaged." });
  return el(
    "div",
    { class: "alarm", role: "alert" },
    el("strong", { text: `Killswitch engaged (${flags.length})` }),
    el(
      "ul",
      {},
      flags.map((f) => el("li", { text: `${f.scope}${f.target ? " " + f.target : ""}${f.hard ? " (hard)" : ""}: ${f.reason} — by ${f.by}, ${when(f.at)}` })),
    ),
  );
}

// ---------------------------------------------------------------------------------------------------- overview

export function statsView(root) {
  const errors = el("div");
  const updated = el("span", { class: "muted" });
  const body = el("div");
  const auto = el("input", { type: "checkbox", checked: true });

  async function load() {
    const all = await attempt(errors, () =>
      Promise.all([api("GET", "/v1/admin/stats"), api("GET", "/v1/admin/agents"), api("GET", "/v1/admin/killswitch")]),
    );
    if (!all) return;
    const [stats, agents, flags] = all;
    const byId = new Map(agents.map((a) => [a.id, a]));
    const tokens = Object.entries(stats.tokens_today).sort(([, a], [, b]) => b - a);
    const active = agents.filter((a) => ["running", "starting", "pending"].includes(a.status));
    fill(
      body,
      engagedBanner(flags),
      el(
        "div",
        { class: "cards" },
        el("div", { class: "card" }, el("div", { class: "muted", text: "Customers" }), el("div", { class: "big", text: String(stats.customers) })),
        counts("Agents", stats.agents_by_status),
        counts("Tasks", stats.tasks_by_status),
        el(
          "div",
          { class: "card" },
          el("div", { class: "muted", text: "Tokens today" }),
          el("div", { class: "big", text: String(tokens.reduce((sum, [, n]) => sum + n, 0)) }),
        ),
      ),
      el("h3", { text: "Allocations: CPU and memory" }),
      table(
        [
          ["Agent", (a) => el("span", {}, (byId.get(a.agent_id) || {}).name || "", el("div", { class: "muted mono", text: a.agent_id }))],
          ["Customer", (a) => a.customer_id],
          ["Allocation", (a) => a.alloc_id],
          ["CPU", (a) => el("span", {}, el("meter", { min: "0", max: "100", high: "80", value: String(Math.min(a.cpu_percent, 100)) }), ` ${a.cpu_percent.toFixed(1)} %`)],
          [
            "Memory",
            (a) => {
              const limit = ((byId.get(a.agent_id) || {}).resources || {}).memory_mb;
              const text = ` ${a.memory_rss_mb.toFixed(0)} MB${limit ? ` of ${limit}` : ""}`;
              return limit
                ? el("span", {}, el("meter", { min: "0", max: String(limit), high: String(limit * 0.8), value: String(Math.min(a.memory_rss_mb, limit)) }), text)
                : text;
            },
          ],
        ],
        stats.allocations,
        "No allocation reports its use (none running, or the scheduler does not report it).",
      ),
      el("h3", { text: `Active agents (${active.length})` }),
      table(
        [
          ["Agent", (a) => el("span", {}, el("strong", { text: a.name }), el("div", { class: "muted mono", text: a.id }))],
          ["Customer", (a) => a.customer_id],
          ["Status", (a) => badge(a.status)],
          ["Resources", (a) => `${a.resources.cpu} MHz, ${a.resources.memory_mb} MB × ${a.replicas}`],
        ],
        active,
        "No agent is running.",
      ),
      el("h3", { text: "Tokens today by customer" }),
      table([["Customer", ([id]) => id], ["Tokens", ([, n]) => String(n)]], tokens, "No tokens used today."),
    );
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  fill(
    root,
    el(
      "section",
      { class: "panel" },
      el("div", { class: "toolbar" }, el("h2", { text: "Platform" }), el("label", { class: "check" }, auto, `refresh every ${REFRESH_MS / 1000} s`), updated),
      errors,
      body,
    ),
  );
  return every(REFRESH_MS, () => (auto.checked ? load() : undefined)); // checked at first: the first load runs
}

// ---------------------------------------------------------------------------------------------------- agents

export function adminAgentsView(root) {
  const errors = el("div"); // the list's load: each refresh clears it
  const actionErrors = el("div"); // Force stop's: kept until the next one
  const list = el("div");
  const filter = el("input", { placeholder: "customer id or name", type: "search" });

  async function load() {
    const agents = await attempt(errors, () => api("GET", "/v1/admin/agents"));
    if (!agents) return;
    const q = filter.value.trim().toLowerCase();
    const shown = q ? agents.filter((a) => a.customer_id.toLowerCase().includes(q) || a.name.toLowerCase().includes(q)) : agents;
    const forceStop = (agent) =>
      actionButton("Force stop", () => api("POST", `/v1/admin/agents/${seg(agent.id)}/stop`), {
        slot: actionErrors,
        then: load,
        cls: "danger",
        disabled: agent.desired === "stopped",
        confirm: `Stop agent ${agent.name} of ${agent.customer_id}? Its owner can start it again.`,
      });
    fill(
      list,
      table(
        [
          ["Agent", (a) => el("span", {}, el("strong", { text: a.name }), el("div", { class: "muted mono", text: a.id }))],
          ["Customer", (a) => a.customer_id],
          ["Status", (a) => el("span", {}, badge(a.status), a.status_reason ? el("div", { class: "muted", text: a.status_reason }) : null)],
          ["Model", (a) => `${a.model.provider} / ${a.model.name}`],
          ["Resources", (a) => `${a.resources.cpu} MHz, ${a.resources.memory_mb} MB × ${a.replicas}`],
          ["Updated", (a) => when(a.updated_at)],
          ["", forceStop],
        ],
        shown,
        "No agents.",
      ),
    );
  }

  filter.addEventListener("input", () => load());
  fill(
    root,
    el(
      "section",
      { class: "panel" },
      el("div", { class: "toolbar" }, el("h2", { text: "Every customer's agents" }), filter, el("span", { class: "muted", text: REFRESHES })),
      actionErrors,
      errors,
      list,
    ),
  );
  return every(REFRESH_MS, load);
}

// ---------------------------------------------------------------------------------------------------- killswitch

export function killswitchView(root) {
  const errors = el("div");
  const engaged = el("div");
  const outcome = el("div");
  const scope = el("select", { name: "scope" }, ["all", "customer", "agent"].map((s) => el("option", { value: s, text: s })));
  const customerId = el("input", { name: "customer_id", placeholder: "cu-…" });
  const agentId = el("input", { name: "agent_id", placeholder: "ag-…" });
  const customerLabel = field("Customer id", customerId);
  const agentLabel = field("Agent id", agentId);
  const reason = el("input", { name: "reason", maxlength: "500", placeholder: "why (shown to the customer's agents and in the audit)" });
  const hard = el("input", { type: "checkbox", name: "hard" });
  const engage = actionButton("Engage", () => send(request(true)), { cls: "danger" });
  const release = actionButton("Release", () => send(request(false)));

  function showTargets() {
    customerLabel.hidden = scope.value !== "customer";
    agentLabel.hidden = scope.value !== "agent";
  }
  scope.addEventListener("change", showTargets);
  showTargets();

  function request(on, flag = null) {
    const body = flag
      ? { scope: flag.scope, engaged: on, reason: reason.value.trim() || "released from the dashboard" }
      : { scope: scope.value, engaged: on, reason: reason.value.trim(), hard: on ? hard.checked : false };
    const target = flag ? flag.target : scope.value === "customer" ? customerId.value.trim() : agentId.value.trim();
    if (body.scope === "customer") body.customer_id = target;
    if (body.scope === "agent") body.agent_id = target;
    return body;
  }

  function showOutcome(result) {
    const parts = [
      result.nothing_to_release
        ? "Nothing was engaged there: nothing to release."
        : `${result.engaged ? "Engaged" : "Released"} at scope ${result.scope}${result.target ? " " + result.target : ""}: ` +
          `${result.acknowledged} of ${counted(result.covered, "agent")} acknowledged in ${Math.round(result.elapsed_ms)} ms.`,
    ];
    if (result.unacknowledged.length) parts.push(el("div", { text: `Not acknowledged: ${result.unacknowledged.join(", ")}` }));
    if (result.stopped && result.stopped.length) parts.push(el("div", { text: `Jobs stopped: ${result.stopped.join(", ")}` }));
    showNotice(outcome, ...parts);
  }

  /** Engage or release (the button that calls it is disabled meanwhile); the outcome, or its error, stays. */
  async function send(body) {
    if (body.engaged && !body.reason) {
      showError(outcome, new Error("Give a reason: the agents' owners and the audit log will read it."));
      return;
    }
    if (body.engaged && body.scope === "all") {
      const sure = window.confirm(
        "Engage the killswitch for EVERY agent of EVERY customer?\n\nTheir running tasks end killed and they take no new work until it is released.",
      );
      if (!sure) return;
    }
    const result = await attempt(outcome, () => api("POST", "/v1/admin/killswitch", { body }));
    if (result) showOutcome(result);
    load();
  }

  async function load() {
    const flags = await attempt(errors, () => api("GET", "/v1/admin/killswitch"));
    if (!flags) return;
    const releaseFlag = (flag) => actionButton("Release", () => send(request(false, flag)));
    fill(
      engaged,
      engagedBanner(flags),
      table(
        [
          ["Scope", (f) => f.scope],
          ["Target", (f) => f.target || "every agent"],
          ["Reason", (f) => f.reason],
          ["By", (f) => f.by],
          ["At", (f) => when(f.at)],
          ["Hard", (f) => (f.hard ? "yes" : "no")],
          ["", releaseFlag],
        ],
        flags,
        "",
      ),
    );
  }

  const broadcastText = el("textarea", { name: "message", required: true, maxlength: "2000" });
  const broadcastOutcome = el("div");
  const broadcast = el("form", {}, field("Message to every running agent", broadcastText), el("div", {}, el("button", { type: "submit", text: "Broadcast" })), broadcastOutcome);
  broadcast.addEventListener("submit", async (e) => {
    e.preventDefault();
    const result = await attempt(broadcastOutcome, () => api("POST", "/v1/admin/broadcast", { body: { message: broadcastText.value } }), e.submitter);
    if (result) showNotice(broadcastOutcome, `Sent to ${counted(result.agents_running, "running agent")}.`);
  });

  fill(
    root,
    el("section", { class: "panel" }, el("h2", { text: "Engaged now" }), errors, engaged),
    el(
      "section",
      { class: "panel" },
      el("h2", { text: "Emergency stop" }),
      el(
        "div",
        { class: "fields" },
        field("Scope", scope),
        customerLabel,
        agentLabel,
        field("Reason", reason),
      ),
      el("label", { class: "check" }, hard, "Hard: also stop their jobs (their owners cannot start them while it is engaged)"),
      el("div", { class: "toolbar" }, engage, release),
      outcome,
    ),
    el("section", { class: "panel" }, el("h2", { text: "Broadcast" }), broadcast),
  );
  return every(REFRESH_MS, load);
}

// ---------------------------------------------------------------------------------------------------- customers

/**
 * A customer's API keys, by prefix and creation (the secret is shown once, when issued: the API keeps none), each
 * with a Revoke button that asks first. Revoked keys are counted, not listed. `load` (re)reads them; `onRevoked`
 * gets the prefix of a key just revoked.
 */
function customerKeys(customer, onRevoked) {
  const errors = el("div"); // the list's load
  const actionErrors = el("div"); // Revoke's: kept until the next one
  const list = el("div");

  async function load() {
    const keys = await attempt(errors, () => api("GET", "/v1/admin/keys", { query: { customer_id: customer.id } }));
    if (!keys) {
      list.replaceChildren(); // keys listed before may have been revoked since
      return;
    }
    const active = keys.filter((k) => !k.revoked_at);
    const revoked = keys.length - active.length;
    const revoke = (key) =>
      actionButton("Revoke", () => api("DELETE", `/v1/admin/keys/${seg(key.prefix)}`), {
        slot: actionErrors,
        then: () => {
          onRevoked(key.prefix);
          load();
        },
        cls: "danger",
        confirm: `Revoke API key ${key.prefix} of ${customer.name}?\n\nIt signs in no more, and the sessions it opened end within seconds.`,
      });
    fill(
      list,
      table(
        [
          ["Prefix", (k) => el("span", { class: "mono", text: k.prefix })],
          ["Created", (k) => when(k.created_at)],
          ["", revoke],
        ],
        active,
        "No active API key: the customer cannot sign in until a new one is issued.",
      ),
      revoked ? el("p", { class: "muted", text: `${counted(revoked, "revoked key")} not listed.` }) : null,
    );
  }

  return { node: el("div", {}, actionErrors, errors, list), load };
}

function quotaForm(customer, usage, onSaved) {
  const errors = el("div");
  const tier = el("select", { name: "tier" }, TIERS.map((t) => el("option", { value: t, text: t, selected: t === usage.quota.tier })));
  const inputs = ["max_agents", "max_cpu", "max_memory_mb", "max_concurrent_tasks", "tokens_per_day"].map((name) => [
    name,
    el("input", { type: "number", min: "0", name, value: usage.quota[name] === null ? "" : String(usage.quota[name]), placeholder: "unlimited" }),
  ]);
  const form = el(
    "form",
    {},
    el("div", { class: "fields" }, field("Tier", tier), inputs.map(([name, input]) => field(name.replace(/_/g, " "), input))),
    el("p", { class: "muted", text: "An empty field is unlimited. Only the fields you change are saved: another admin's change to the others stays." }),
    el("div", {}, el("button", { type: "submit", class: "primary", text: "Save quota" })),
    errors,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {};
    if (tier.value !== usage.quota.tier) body.tier = tier.value;
    for (const [name, input] of inputs) {
      const value = numberOrNull(input);
      if (value !== usage.quota[name]) body[name] = value;
    }
    if (Object.keys(body).length === 0) {
      errors.replaceChildren(el("p", { class: "muted", text: "Nothing changed." }));
      return;
    }
    const saved = await attempt(errors, () => api("PATCH", `/v1/admin/customers/${seg(customer.id)}/quota`, { body }), e.submitter);
    if (saved) onSaved();
  });
  return form;
}

export function customersView(root) {
  const errors = el("div");
  const list = el("div");
  const detail = el("div");
  const name = el("input", { name: "name", required: true, placeholder: "acme" });
  const created = el("div");
  const form = el("form", { class: "inline" }, field("New customer's name", name), el("button", { type: "submit", class: "primary", text: "Create customer" }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const customer = await attempt(created, () => api("POST", "/v1/admin/customers", { body: { name: name.value.trim() } }), e.submitter);
    if (customer) {
      name.value = "";
      showNotice(created, `Customer ${customer.name} (${customer.id}) created. Their API key, shown this once: `, el("code", { class: "secret", text: customer.api_key }));
      load();
    }
  });

  async function show(customer) {
    const keySlot = el("div");
    const info = await attempt(errors, () => api("GET", `/v1/admin/customers/${seg(customer.id)}`));
    if (!info) return;
    let shown = null; // the new key whose secret keySlot shows
    const keys = customerKeys(info, (prefix) => {
      if (shown?.startsWith(prefix)) keySlot.replaceChildren(); // a revoked key's secret is no use to anyone
    });
    const newKey = el("button", { type: "button", text: "New API key" });
    newKey.addEventListener("click", async () => {
      shown = null;
      const key = await attempt(keySlot, () => api("POST", `/v1/admin/customers/${seg(customer.id)}/keys`), newKey);
      if (!key) return;
      shown = key.api_key;
      showNotice(keySlot, "New API key, shown this once: ", el("code", { class: "secret", text: key.api_key }));
      keys.load();
    });
    fill(
      detail,
      el(
        "section",
        { class: "panel" },
        el("div", { class: "toolbar" }, el("h2", { text: `${info.name}` }), el("span", { class: "muted mono", text: info.id }), newKey),
        keySlot,
        el("h3", { text: "API keys" }),
        keys.node,
        el("h3", { text: "Usage" }),
        usageTable(info.usage),
        el("h3", { text: "Quota" }),
        quotaForm(info, info.usage, () => show(customer)),
      ),
    );
    keys.load();
  }

  async function load() {
    const customers = await attempt(errors, () => api("GET", "/v1/admin/customers"));
    if (!customers) return;
    const open = (c) => actionButton("Quota & usage", () => show(c));
    fill(
      list,
      table(
        [
          ["Name", (c) => c.name],
          ["Id", (c) => el("span", { class: "mono", text: c.id })],
          ["Created", (c) => when(c.created_at)],
          ["", open],
        ],
        customers,
        "No customers yet.",
      ),
    );
  }

  fill(root, el("div", { class: "split" }, el("section", { class: "panel" }, el("h2", { text: "Customers" }), form, created, errors, list), detail));
  load();
  return () => {};
}

// ---------------------------------------------------------------------------------------------------- audit

export function auditView(root) {
  const errors = el("div");
  const list = el("div");
  const inputs = {
    actor: el("input", { name: "actor", placeholder: "admin:… or key:…" }),
    action: el("input", { name: "action", placeholder: "killswitch.engage" }),
    customer_id: el("input", { name: "customer_id", placeholder: "cu-…" }),
    since: el("input", { name: "since", placeholder: "2024-01-01T00:00:00Z" }),
    until: el("input", { name: "until", placeholder: "2024-01-31T23:59:59Z" }),
    limit: el("input", { name: "limit", type: "number", min: "1", max: "1000", value: "100" }),
  };
  const form = el(
    "form",
    { class: "inline" },
    Object.entries(inputs).map(([name, input]) => field(name.replace("_", " "), input)),
    el("button", { type: "submit", class: "primary", text: "Search" }),
  );

  async function load(button = null) {
    const query = {};
    for (const [name, input] of Object.entries(inputs)) query[name] = input.value.trim();
    const records = await attempt(errors, () => api("GET", "/v1/admin/audit", { query }), button);
    if (!records) {
      list.replaceChildren(); // what an earlier search found is not what this one asked for
      return;
    }
    fill(
      list,
      el("p", { class: "muted", text: `${records.length} records, newest first.` }),
      table(
        [
          ["At", (r) => when(r.at)],
          ["Actor", (r) => `${r.actor} (${r.role})`],
          ["Action", (r) => r.action],
          ["Result", (r) => badge(r.result, r.result === "ok" ? "completed" : "failed")],
          ["Customer", (r) => r.customer_id || ""],
          ["Target", (r) => r.target || ""],
          ["Details", (r) => el("pre", { text: Object.keys(r.details || {}).length ? JSON.stringify(r.details) : "" })],
        ],
        records.slice().reverse(),
        "No records match.",
      ),
    );
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    load(e.submitter);
  });
  fill(root, el("section", { class: "panel" }, el("h2", { text: "Audit log" }), form, errors, list));
  load();
  return () => {};
}
