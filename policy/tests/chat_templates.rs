//! Chat templates that use what Qwen's templates use (tools with their schemas as JSON, tool
//! calls whose arguments are a string or a mapping, tool responses folded into a user turn,
//! `enable_thinking`, reasoning split off at `</think>`, a reversed scan for the last user
//! query with a namespace) render exactly as transformers' `apply_chat_template` renders them.
//! The templates are written here; transformers renders the same strings.
use selfplay_policy::{ChatOptions, PolicyError, Tokenizer};
use serde_json::json;

/// Qwen2.5-style: a default system turn, a tools section, tool calls and responses.
const TOOLS_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nSignatures in <tools></tools>:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nAnswer with <tool_call></tool_call> holding {\"name\": ..., \"arguments\": ...}.<|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Qwen3-style: reasoning kept only after the last real user query, `enable_thinking`.
const THINKING_TEMPLATE: &str = r#"{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"#;

fn conversations() -> Vec<serde_json::Value> {
    vec![
        json!([{"role": "user", "content": "What is 2 + 2?"}]),
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}
            ]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "tool", "content": "{\"sky\": \"clear\"}"},
            {"role": "assistant", "content": "21 °C and clear."},
            {"role": "user", "content": "And Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}
            ]}
        ]),
        json!([
            {"role": "user", "content": "Think first: 17 * 3?"},
            {"role": "assistant", "content": "<think>\n17 * 3 = 51\n</think>\n\n51"},
            {"role": "user", "content": "<tool_response>x</tool_response>"},
            {"role": "assistant", "reasoning_content": "\nsecond thought\n", "content": "\nDone."}
        ]),
    ]
}

fn tools() -> Vec<serde_json::Value> {
    vec![json!({"type": "function", "function": {
        "name": "get_weather", "description": "Current weather — by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["°C", "°F"]}},
                       "required": ["city"]}}})]
}

/// Renders every conversation with and without the generation prompt, here and in transformers.
fn compare(template: &str, tools: Option<Vec<serde_json::Value>>, extra: serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    selfplay_tests::tiny_tokenizer(dir);
    let cfg = json!({"chat_template": template, "eos_token": "t2", "bos_token": "t1"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::load(dir).unwrap();
    let (inp, outp) = (dir.join("in.json"), dir.join("out.json"));
    let spec = json!({"conversations": conversations(), "tools": tools, "kwargs": extra});
    std::fs::write(&inp, spec.to_string()).unwrap();
    selfplay_tests::run_python(
        "hf_reference.py",
        &["chat", dir.to_str().unwrap(), inp.to_str().unwrap(), outp.to_str().unwrap()],
    );
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();
    let mut k = 0;
    for c in conversations() {
        for add_generation_prompt in [true, false] {
            let opts = ChatOptions {
                add_generation_prompt,
                tools: tools.clone(),
                extra: extra.as_object().cloned().unwrap_or_default(),
            };
            let got = tok.render_chat_json(&c, &opts).unwrap();
            assert_eq!(got, want["rendered"][k].as_str().unwrap(), "conversation {k} with {opts:?}");
            k += 1;
        }
    }
}

#[test]
fn tools_template_matches_transformers() {
    compare(TOOLS_TEMPLATE, Some(tools()), json!({}));
    compare(TOOLS_TEMPLATE, None, json!({}));
}

#[test]
fn thinking_template_matches_transformers() {
    compare(THINKING_TEMPLATE, None, json!({}));
    compare(THINKING_TEMPLATE, None, json!({"enable_thinking": false}));
    compare(THINKING_TEMPLATE, None, json!({"enable_thinking": true}));
}

#[test]
fn reserved_template_variables_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_tokenizer(tmp.path());
    let tok = Tokenizer::load(tmp.path()).unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert("messages".into(), json!([]));
    let opts = ChatOptions { extra, ..Default::default() };
    let err = tok.render_chat_json(&conversations()[0], &opts).unwrap_err();
    assert!(matches!(&err, PolicyError::ChatTemplate(m) if m.contains("messages")), "{err}");
    let err = tok.render_chat_json(&json!({"role": "user"}), &ChatOptions::default()).unwrap_err();
    assert!(matches!(&err, PolicyError::ChatTemplate(m) if m.contains("list")), "{err}");
}
