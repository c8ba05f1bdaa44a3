// A customer's views: agents, teams, tasks (started and watched live), usage. Each view function fills `root`
// and returns the function that stops what it runs (refreshes, streams).

import { api, seg } from "./api.js";
import { REFRESHES, REFRESH_MS, actionButton, attempt, badge, el, every, field, fill, numberOrNull, showNotice, table, when } from "./dom.js";
import { openTask } from "./task.js";

const PROVIDERS = ["replay", "local", "openai", "openrouter", "groq", "deepseek", "anthropic", "ollama"];
const TOOLS = ["calculator", "current_time", "word_count"];
const MODES = ["round_robin", "selector", "swarm"];
const TASK_STATUSES = ["queued", "running", "awaiting_input", "completed", "failed", "cancelled", "killed"];
const PAGE = 25; // tasks listed at a time
function modelFields(prefix) {
  const provider = el("select", { name: `${prefix}provider` }, PROVIDERS.map((p) => el("option", { value: p, text: p })));
  const name = el("input", { name: `${prefix}name`, required: true, value: "scripted", placeholder: "gpt-4o-mini" });
  const baseUrl = el("input", { type: "url", name: `${prefix}base_url`, maxlength: "500", placeholder: "the server's URL" });
  const baseUrlLabel = field("Ollama server's URL", baseUrl);
  const responses = el("textarea", { name: `${prefix}responses`, placeholder: "One scripted answer per line" });
  const responsesLabel = field("Scripted responses", responses);
  const showFields = () => {
    // each only where the API takes it: base_url for ollama, responses for replay
    baseUrlLabel.hidden = provider.value !== "ollama";
    responsesLabel.hidden = provider.value !== "replay";
  };
  provider.addEventListener("change", showFields);
  showFields();
  return {
    nodes: [field("Model provider", provider), field("Model name", name), baseUrlLabel, responsesLabel],
    value() {
      const model = { provider: provider.value, name: name.value.trim() };
      if (provider.value === "ollama" && baseUrl.value.trim()) model.base_url = baseUrl.value.trim();
      if (provider.value === "replay") {
        model.responses = responses.value.split("\n").map((r) => r.trim()).filter(Boolean);
      }
      return model;
    },
  };
}

// ---------------------------------------------------------------------------------------------------- agents

function agentForm(onCreated) {
  const errors = el("div");
  const name = el("input", { name: "name", required: true, maxlength: "64", placeholder: "helper", pattern: "[A-Za-z][A-Za-z0-9_]*" });
  const system = el("textarea", { name: "system_message", text: "You are a helpful assistant." });
  const model = modelFields("");
  const tools = TOOLS.map((t) => el("input", { type: "checkbox", name: "tools", value: t }));
  // the limits of the API's models (control/models.py: Resources, AgentCreate)
  const cpu = el("input", { type: "number", name: "cpu", value: "200", min: "50", max: "16000" });
  const memory = el("input", { type: "number", name: "memory_mb", value: "256", min: "128", max: "65536" });
  const replicas = el("input", { type: "number", name: "replicas", value: "1", min: "1", max: "10" });
  const form = el(
    "form",
    {},
    el(
      "div",
      { class: "fields" },
      field("Name (letters, digits, _)", name),
      ...model.nodes,
      field("CPU (MHz)", cpu),
      field("Memory (MB)", memory),
      field("Replicas", replicas),
    ),
    field("System message", system),
    el("div", { class: "toolbar" }, "Tools:", tools.map((box) => el("label", { class: "check" }, box, box.value))),
    el("div", {}, el("button", { type: "submit", class: "primary", text: "Create agent" })),
    errors,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {
      name: name.value.trim(),
      system_message: system.value,
      model: model.value(),
      tools: tools.filter((box) => box.checked).map((box) => box.value),
      resources: { cpu: numberOrNull(cpu), memory_mb: numberOrNull(memory) },
      replicas: numberOrNull(replicas),
    };
    for (const [key, value] of Object.entries(body.resources)) if (value === null) delete body.resources[key];
    if (body.replicas === null) delete body.replicas;
    const agent = await attempt(errors, () => api("POST", "/v1/agents", { body }), e.submitter);
    if (agent) {
      showNotice(errors, `Agent ${agent.name} created (${agent.id}), status ${agent.status}.`);
      name.value = "";
      onCreated();
    }
  });
  return el("details", { class: "panel" }, el("summary", { text: "New agent" }), form);
}

export function agentsView(root) {
  const list = el("div");
  const errors = el("div"); // the list's load: each refresh clears it
  const actionErrors = el("div"); // the buttons': kept until the next action
  const job = el("div");

  async function load() {
    const agents = await attempt(errors, () => api("GET", "/v1/agents"));
    if (!agents) return;
    const act = { slot: actionErrors, then: load };
    const stop = (a) => actionButton("Stop", () => api("POST", `/v1/agents/${seg(a.id)}/stop`), act);
    const start = (a) => actionButton("Start", () => api("POST", `/v1/agents/${seg(a.id)}/start`), act);
    const remove = (a) =>
      actionButton("Delete", () => api("DELETE", `/v1/agents/${seg(a.id)}`), {
        ...act,
        cls: "danger",
        confirm: `Delete agent ${a.name}? Its unfinished tasks end cancelled.`,
      });
    const showJob = (a) =>
      actionButton(
        "Job",
        async () => {
          const spec = await api("GET", `/v1/agents/${seg(a.id)}/job`);
          fill(job, el("section", { class: "panel" }, el("h3", { text: `Nomad job of ${a.name}` }), el("pre", { text: JSON.stringify(spec, null, 2) })));
        },
        { slot: actionErrors },
      );
    fill(
      list,
      table(
        [
          ["Name", (a) => el("span", {}, el("strong", { text: a.name }), el("div", { class: "muted mono", text: a.id }))],
          ["Status", (a) => el("span", {}, badge(a.status), a.status_reason ? el("div", { class: "muted", text: a.status_reason }) : null)],
          ["Model", (a) => `${a.model.provider} / ${a.model.name}`],
          ["Tools", (a) => a.tools.join(", ")],
          ["Resources", (a) => `${a.resources.cpu} MHz, ${a.resources.memory_mb} MB × ${a.replicas}`],
          // a failed agent is still meant to run: it may be started again (or stopped)
          ["", (a) => el("span", {}, a.desired === "stopped" || a.status === "failed" ? start(a) : null, a.desired === "stopped" ? null : stop(a), showJob(a), remove(a))],
        ],
        agents,
        "No agents yet: create one above.",
      ),
    );
  }

  fill(
    root,
    agentForm(load),
    el("section", { class: "panel" }, el("div", { class: "toolbar" }, el("h2", { text: "Agents" }), el("span", { class: "muted", text: REFRESHES })), actionErrors, errors, list),
    job,
  );
  return every(REFRESH_MS, load);
}

// ---------------------------------------------------------------------------------------------------- teams

function teamForm(agents, onCreated) {
  const errors = el("div");
  const name = el("input", { name: "name", required: true, placeholder: "writers" });
  const members = agents.map((a) => el("input", { type: "checkbox", name: "members", value: a.id }));
  const picked = []; // the members' ids in the order they were checked: the team's order
  const order = el("p", { class: "muted" });
  const names = new Map(agents.map((a) => [a.id, a.name]));
  const showOrder = () => {
    order.textContent = picked.length ? `Order: ${picked.map((id) => names.get(id)).join(" → ")}` : "Check the members in the order they take turns.";
  };
  for (const box of members) {
    box.addEventListener("change", () => {
      const at = picked.indexOf(box.value);
      if (box.checked && at < 0) picked.push(box.value);
      if (!box.checked && at >= 0) picked.splice(at, 1);
      showOrder();
    });
  }
  showOrder();
  const mode = el("select", { name: "mode" }, MODES.map((m) => el("option", { value: m, text: m })));
  const selector = modelFields("selector_");
  const selectorBox = el("div", { class: "fields", hidden: true }, selector.nodes);
  mode.addEventListener("change", () => {
    selectorBox.hidden = mode.value !== "selector";
  });
  const maxMessages = el("input", { type: "number", name: "max_messages", min: "1", value: "6" });
  const mention = el("input", { name: "text_mention", placeholder: "TERMINATE" });
  const timeout = el("input", { type: "number", name: "timeout_s", min: "1", step: "any" });
  const maxTokens = el("input", { type: "number", name: "max_tokens", min: "1" });
  const toUser = el("input", { type: "checkbox", name: "handoff_to_user" });
  const handoffs = el("textarea", { name: "handoffs", placeholder: '{"ag-…": ["ag-…", "user"]} (swarm; optional)' });
  const form = el(
    "form",
    {},
    el("div", { class: "fields" }, field("Name", name), field("Mode", mode)),
    el(
      "fieldset",
      {},
      el("legend", { text: "Members, in order" }),
      members.length ? members.map((box, i) => el("label", { class: "check" }, box, `${agents[i].name} (${agents[i].id})`)) : el("p", { class: "empty", text: "Create agents first." }),
      members.length ? order : null,
    ),
    selectorBox,
    el(
      "fieldset",
      {},
      el("legend", { text: "Termination (any that is set ends the run)" }),
      el("div", { class: "fields" }, field("Max messages", maxMessages), field("Text mention", mention), field("Timeout (s)", timeout), field("Max tokens", maxTokens)),
      el("label", { class: "check" }, toUser, "Stop when a member hands off to the user"),
    ),
    field("Handoffs (JSON)", handoffs),
    el("div", {}, el("button", { type: "submit", class: "primary", text: "Create team" })),
    errors,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const termination = {};
    const set = (key, value) => {
      if (value !== null && value !== "") termination[key] = value;
    };
    set("max_messages", numberOrNull(maxMessages));
    set("text_mention", mention.value.trim());
    set("timeout_s", numberOrNull(timeout));
    set("max_tokens", numberOrNull(maxTokens));
    if (toUser.checked) termination.handoff_to_user = true;
    const body = {
      name: name.value.trim(),
      members: [...picked], // (kept as the boxes are checked and unchecked)
      mode: mode.value,
      termination,
    };
    if (mode.value === "selector") body.selector = { model: selector.value() };
    await attempt(errors, async () => {
      if (handoffs.value.trim()) {
        try {
          body.handoffs = JSON.parse(handoffs.value);
        } catch (err) {
          throw new Error(`Handoffs are not JSON: ${err.message}`);
        }
      }
      const team = await api("POST", "/v1/teams", { body });
      showNotice(errors, `Team ${team.name} created (${team.id}).`);
      name.value = "";
      onCreated();
    }, e.submitter);
  });
  return el("details", { class: "panel" }, el("summary", { text: "New team" }), form);
}

export function teamsView(root) {
  const errors = el("div");
  const actionErrors = el("div");
  const formSlot = el("div");
  const list = el("div");

  async function load() {
    const both = await attempt(errors, () => Promise.all([api("GET", "/v1/teams"), api("GET", "/v1/agents")]));
    if (!both) return;
    const [teams, agents] = both;
    const names = new Map(agents.map((a) => [a.id, a.name]));
    const ids = agents.map((a) => a.id).join(",");
    if (!formSlot.firstChild || formSlot.dataset.agents !== ids) {
      formSlot.dataset.agents = ids;
      fill(formSlot, teamForm(agents, load));
    }
    const remove = (team) =>
      actionButton("Delete", () => api("DELETE", `/v1/teams/${seg(team.id)}`), {
        slot: actionErrors,
        then: load,
        cls: "danger",
        confirm: `Delete team ${team.name}? Its agents stay.`,
      });
    const terms = (t) =>
      Object.entries(t.termination)
        .filter(([, v]) => v !== null && v !== false)
        .map(([k, v]) => `${k}: ${v}`)
        .join(", ");
    fill(
      list,
      table(
        [
          ["Name", (t) => el("span", {}, el("strong", { text: t.name }), el("div", { class: "muted mono", text: t.id }))],
          ["Mode", (t) => t.mode],
          ["Members", (t) => t.members.map((id) => names.get(id) || id).join(" → ")],
          ["Termination", terms],
          ["Created", (t) => when(t.created_at)],
          ["", remove],
        ],
        teams,
        "No teams yet.",
      ),
    );
  }

  fill(root, formSlot, el("section", { class: "panel" }, el("h2", { text: "Teams" }), actionErrors, errors, list));
  load();
  return () => {};
}

// ---------------------------------------------------------------------------------------------------- tasks

export function tasksView(root) {
  const errors = el("div");
  const startErrors = el("div"); // Start's: kept until it is tried again
  const targetErrors = el("div"); // loading the agents and teams to choose from: each refresh clears it
  const list = el("div");
  const watcher = el("div");
  const more = el("button", { type: "button", text: "Older tasks", hidden: true });
  const statusFilter = el("select", { name: "status" }, el("option", { value: "", text: "any status" }), TASK_STATUSES.map((s) => el("option", { value: s, text: s })));
  const target = el("select", { name: "target", required: true });
  const text = el("textarea", { name: "task", required: true, placeholder: "What is 6 times 7?" });
  let closeTask = () => {};
  let shown = [];
  let live = null; // the open task as its view knows it: ahead of the records listed, which follow its events
  let loading = Promise.resolve(); // the list's load under way (see load)

  const startForm = el(
    "form",
    { class: "panel" },
    el("h2", { text: "Start a task" }),
    field("On", target),
    targetErrors,
    field("Task", text),
    el("div", {}, el("button", { type: "submit", class: "primary", text: "Start" })),
    startErrors,
  );
  startForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const [kind, id] = target.value.split(":");
    const body = { task: text.value };
    body[kind === "team" ? "team_id" : "agent_id"] = id;
    const task = await attempt(startErrors, () => api("POST", "/v1/tasks", { body }), e.submitter);
    if (task) {
      text.value = "";
      open(task.id);
      load();
    }
  });

  /** The agents and teams to start a task on, each agent with its status as of now (refreshed with the list). */
  async function targets() {
    const both = await attempt(targetErrors, () => Promise.all([api("GET", "/v1/agents"), api("GET", "/v1/teams")]));
    if (!both) return;
    const [agents, teams] = both;
    const options = [
      ...agents.map((a) => ["Agents", `agent:${a.id}`, `${a.name} (${a.status})`]),
      ...teams.map((t) => ["Teams", `team:${t.id}`, `${t.name} (${t.mode})`]),
    ];
    const current = [...target.options];
    if (current.length === options.length && current.every((o, i) => o.value === options[i][1])) {
      // the same choices: only their texts change, so an open list and the choice made stay as they are
      current.forEach((o, i) => {
        if (o.textContent !== options[i][2]) o.textContent = options[i][2];
      });
      return;
    }
    const chosen = target.value;
    const group = (label) =>
      el("optgroup", { label }, options.filter(([g]) => g === label).map(([, value, text]) => el("option", { value, text })));
    fill(target, group("Agents"), group("Teams"));
    if (options.some(([, value]) => value === chosen)) target.value = chosen;
  }

  function open(id) {
    closeTask();
    live = null;
    closeTask = openTask(watcher, id, {
      onClose: () => {
        closeTask = () => {};
        live = null;
        watcher.replaceChildren();
      },
      onChange: (task) => {
        live = { ...(live && live.id === task.id ? live : {}), ...task };
        render();
      },
    });
  }

  function render() {
    const rows = shown.map((t) => (live && t.id === live.id ? { ...t, ...live } : t));
    const openButton = (t) => actionButton("Open", () => open(t.id));
    fill(
      list,
      table(
        [
          ["Created", (t) => when(t.created_at)],
          ["Task", (t) => el("span", {}, t.task.length > 80 ? t.task.slice(0, 80) + "…" : t.task, el("div", { class: "muted mono", text: t.id }))],
          ["On", (t) => (t.team_id ? `team ${t.team_id}` : `agent ${t.agent_id}`)],
          ["Status", (t) => badge(t.status)],
          ["Tokens", (t) => String(t.usage.prompt_tokens + t.usage.completion_tokens)],
          ["", openButton],
        ],
        rows,
        "No tasks.",
      ),
    );
  }

  /**
   * Load the list, one load at a time (each starts from what the one before left): "newest" reads the first page
   * again (the refresh), keeping the older pages opened below it; "older" adds the next page; "anew" starts over.
   */
  function load(how = "newest") {
    const next = loading.then(() => loadNow(how));
    loading = next.catch(() => {}); // a load that failed does not hold back the next
    return next;
  }

  async function loadNow(how) {
    const before = how === "older" && shown.length ? shown[shown.length - 1].id : null;
    const page = await attempt(errors, () =>
      api("GET", "/v1/tasks", { query: { status: statusFilter.value, limit: PAGE, before } }),
    );
    if (!page) return;
    if (how === "older") {
      shown = shown.concat(page);
      more.hidden = page.length < PAGE;
    } else {
      // the pages opened below the first stay, from where the first now ends (new tasks have pushed it on)
      const end = how === "newest" && page.length === PAGE ? shown.findIndex((t) => t.id === page[PAGE - 1].id) : -1;
      const older = end >= 0 ? shown.slice(end + 1) : [];
      shown = page.concat(older);
      if (!older.length) more.hidden = page.length < PAGE;
    }
    render();
  }

  statusFilter.addEventListener("change", () => load("anew"));
  more.addEventListener("click", () => load("older"));
  fill(
    root,
    el("div", { class: "split" }, startForm, watcher),
    el("section", { class: "panel" }, el("div", { class: "toolbar" }, el("h2", { text: "Tasks" }), statusFilter, el("span", { class: "muted", text: REFRESHES })), errors, list, more),
  );
  const stopRefresh = every(REFRESH_MS, () => Promise.all([targets(), load()]));
  return () => {
    stopRefresh();
    closeTask();
  };
}

// ---------------------------------------------------------------------------------------------------- usage

export function usageRows(usage) {
  const row = (label, used, limit) => [label, used, limit];
  const q = usage.quota;
  return [
    row("Agents", usage.agents, q.max_agents),
    row("CPU (MHz)", usage.cpu, q.max_cpu),
    row("Memory (MB)", usage.memory_mb, q.max_memory_mb),
    row("Tasks in flight", usage.concurrent_tasks, q.max_concurrent_tasks),
    row("Tokens today", usage.tokens_today, q.tokens_per_day),
  ];
}

export function usageTable(usage) {
  return el(
    "div",
    {},
    el("p", {}, "Tier: ", el("strong", { text: usage.quota.tier })),
    table(
      [
        ["What", ([label]) => label],
        ["Used", ([, used]) => String(used)],
        ["Limit", ([, , limit]) => (limit === null || limit === undefined ? "unlimited" : String(limit))],
        ["", ([, used, limit]) => (limit ? el("meter", { min: "0", max: String(limit), value: String(Math.min(used, limit)), high: String(limit * 0.8) }) : "")],
      ],
      usageRows(usage),
    ),
  );
}

export function usageView(root) {
  const errors = el("div");
  const body = el("div");
  async function load() {
    const usage = await attempt(errors, () => api("GET", "/v1/usage"));
    if (usage) fill(body, usageTable(usage));
  }
  fill(root, el("section", { class: "panel" }, el("div", { class: "toolbar" }, el("h2", { text: "Usage and quota" }), el("span", { class: "muted", text: REFRESHES })), errors, body));
  return every(REFRESH_MS, load);
}
