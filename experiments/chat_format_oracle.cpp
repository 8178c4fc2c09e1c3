// llama.cpp 0c1e570's own chat-format code (libllama-common.so) as an oracle for jllama's
// jllama/server/chat_formats.py: reads one JSON request on stdin, prints what
// common_chat_templates_apply chose (format, prompt, generation_prompt, thinking tags) and how
// common_chat_peg_parse splits each output text. Build and use: see experiments/chat_format_oracle.py.
#include "chat.h"

#include <cstdio>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>

static std::string slurp(const std::string & path) {
    FILE * f = fopen(path.c_str(), "rb");
    if (!f) { throw std::runtime_error("cannot open " + path); }
    std::string s;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) { s.append(buf, n); }
    fclose(f);
    return s;
}

int main() {
    std::string in((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    auto req = common_json::parse(in);
    auto out = common_json::object();
    try {
        auto tmpls = common_chat_templates_init(nullptr, slurp(req.at("template").get<std::string>()),
                                                req.contains("bos") ? req.at("bos").get<std::string>() : "",
                                                req.contains("eos") ? req.at("eos").get<std::string>() : "");
        common_chat_templates_inputs inputs;
        inputs.messages = common_chat_msgs_parse_oaicompat(req.at("messages"));
        if (req.contains("tools")) {
            inputs.tools = common_chat_tools_parse_oaicompat(req.at("tools"));
        }
        if (req.contains("tool_choice")) {
            inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(req.at("tool_choice").get<std::string>());
        }
        auto rf = req.contains("reasoning_format") ? req.at("reasoning_format").get<std::string>() : std::string("deepseek");
        inputs.reasoning_format = common_reasoning_format_from_name(rf);
        if (req.contains("enable_thinking")) { inputs.enable_thinking = req.at("enable_thinking").get<bool>(); }
        if (req.contains("parallel_tool_calls")) { inputs.parallel_tool_calls = req.at("parallel_tool_calls").get<bool>(); }
        if (req.contains("add_generation_prompt")) { inputs.add_generation_prompt = req.at("add_generation_prompt").get<bool>(); }
        if (req.contains("kwargs")) {
            for (const auto & [k, v] : req.at("kwargs").items()) { inputs.chat_template_kwargs[k] = v.dump(); }
        }
        auto params = common_chat_templates_apply(tmpls.get(), inputs);
        out["format"] = common_chat_format_name(params.format);
        out["prompt"] = params.prompt;
        out["generation_prompt"] = params.generation_prompt;
        out["supports_thinking"] = params.supports_thinking;
        out["thinking_start_tag"] = params.thinking_start_tag;
        auto ends = common_json::array();
        for (auto & e : params.thinking_end_tags) { ends.push_back(e); }
        out["thinking_end_tags"] = ends;
        auto stops = common_json::array();
        for (auto & e : params.additional_stops) { stops.push_back(e); }
        out["additional_stops"] = stops;
        auto pres = common_json::array();
        for (auto & e : params.preserved_tokens) { pres.push_back(e); }
        out["preserved_tokens"] = pres;
        out["grammar_lazy"] = params.grammar_lazy;
        out["has_grammar"] = !params.grammar.empty();
        auto caps = common_json::object();
        for (const auto & [k, v] : common_chat_templates_get_caps(tmpls.get())) { caps[k] = v; }
        out["caps"] = caps;
        auto parsed = common_json::array();
        if (req.contains("outputs")) {
            common_chat_parser_params pp(params);
            pp.reasoning_format = inputs.reasoning_format;
            pp.reasoning_in_content = req.contains("stream") && req.at("stream").get<bool>() &&
                                      inputs.reasoning_format == COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY;
            pp.parse_tool_calls = !inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
            if (!params.parser.empty()) { pp.parser.load(params.parser); }
            bool partial = req.contains("partial") && req.at("partial").get<bool>();
            for (const auto & o : req.at("outputs")) {
                try {
                    auto msg = common_chat_parse(o.get<std::string>(), partial, pp);
                    auto m = common_json::object();
                    m["content"] = msg.content;
                    m["reasoning_content"] = msg.reasoning_content;
                    auto calls = common_json::array();
                    for (auto & c : msg.tool_calls) {
                        auto cj = common_json::object();
                        cj["name"] = c.name;
                        cj["arguments"] = c.arguments;
                        cj["id"] = c.id;
                        calls.push_back(cj);
                    }
                    m["tool_calls"] = calls;
                    parsed.push_back(m);
                } catch (const std::exception & e) {
                    auto m = common_json::object();
                    m["error"] = std::string(e.what());
                    parsed.push_back(m);
                }
            }
        }
        out["parsed"] = parsed;
    } catch (const std::exception & e) {
        out["error"] = std::string(e.what());
    }
    std::cout << out.dump() << std::endl;
    return 0;
}
