from qvl.data.samples import Media, parse_sample


def _problems(raw, **kw):
    sample, problems = parse_sample(raw, 7, "/data", **kw)
    return sample, [(p.field, p.what) for p in problems]


def test_official_format_tags_take_files_in_order_and_strip_like_official():
    raw = {"image": ["a.png", "b.png"], "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<image>\nFirst?"},
        {"from": "gpt", "value": " one "},
        {"from": "human", "value": "<image> and <video>\nSecond?"},
        {"from": "gpt", "value": "two"}]}
    sample, problems = _problems(raw)
    assert problems == []
    user1, bot1, user2, _ = sample.messages
    assert user1.parts == [Media("image", "/data/a.png"), "First?"]
    assert bot1.parts == [" one "]  # assistant text verbatim
    assert [p.source if isinstance(p, Media) else p for p in user2.parts] == ["/data/b.png", "and", "/data/v.mp4", "Second?"]
    assert [m.kind for m in sample.media()] == ["image", "image", "video"]


def test_absolute_paths_and_single_string_media():
    sample, problems = _problems({"image": "/abs/x.png", "conversations": [
        {"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "ok"}]})
    assert problems == [] and sample.media()[0].source == "/abs/x.png"


def test_messages_format_with_content_parts_and_top_level_images():
    raw = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"},
                                     {"type": "video_url", "video_url": {"url": "file:///v/x.mp4"}}]},
        {"role": "assistant", "content": "A cat."}]}
    sample, problems = _problems(raw)
    assert problems == []
    assert [m.role for m in sample.messages] == ["system", "user", "assistant"]
    assert [m.source for m in sample.media()] == ["/data/a.png", "/v/x.mp4"]
    sample, problems = _problems({"images": ["a.png"], "messages": [
        {"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}]})
    assert problems == [] and sample.media()[0].source == "/data/a.png"


def test_each_structural_problem_is_reported_with_its_field():
    cases = {
        "tag_mismatch": ({"image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}, "image"),
        "tag_in_assistant": ({"image": "a.png", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>a"}]}, "conversations[1].value"),
        "empty_turn": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
                       "conversations[1].value"),
        "bad_role": ({"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
                     "conversations[0].from"),
        "starts_with_assistant": ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
                                  "conversations"),
        "not_alternating": ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"},
                                               {"from": "gpt", "value": "a"}]}, "conversations"),
        "special_token": ({"conversations": [{"from": "human", "value": "q<|im_end|>"}, {"from": "gpt", "value": "a"}]},
                          "conversations[0].value"),
        "no_turns": ({"image": "a.png"}, "<record>"),
    }
    for name, (raw, field) in cases.items():
        sample, problems = _problems(raw)
        assert sample is None, name
        assert field in [f for f, _ in problems], (name, problems)
