"""Email in the production stack: the courier of deploy/authapp-courier.service delivers
what the uWSGI instances queue, to the stack's SMTP server, and a reset link's token works
through nginx; stopping the courier loses nothing."""

from __future__ import annotations

NEW_PASSWORD = "quartz-lantern-meadow-81"


def test_reset_through_nginx_with_the_courier(api, stack):
    user = api.register()
    address = f"{user['username']}@example.com"
    stack.mailbox.wait_for(1, to=address)  # the verification link
    reply = api("POST", "/auth/password-reset/request", json_body={"email": address})
    assert reply.status == 202 and reply.json() == {"status": "accepted"}
    messages = stack.mailbox.wait_for(2, to=address)
    link = messages[-1].link()
    assert link.startswith("https://app.example.com/reset-password#token=")
    reset = api("POST", "/auth/password-reset", json_body={"token": messages[-1].token(), "new_password": NEW_PASSWORD})
    assert reset.status == 200, reset.body
    assert api("GET", "/auth/me", token=user["access_token"]).status == 401
    login = api("POST", "/auth/login", json_body={"email": address, "password": NEW_PASSWORD})
    assert login.status == 200
    notice = stack.mailbox.wait_for(3, to=address)[-1]
    assert "password was changed" in notice.subject
    assert messages[-1].token() not in stack.courier_log.read_text()


def test_messages_wait_while_the_courier_is_stopped(api, stack):
    assert stack.stop_courier() == 0
    user = api.register()
    address = f"{user['username']}@example.com"
    assert api("POST", "/auth/password-reset/request", json_body={"email": address}).status == 202
    assert stack.mailbox.messages(address) == []
    stack.start_courier()
    assert len(stack.mailbox.wait_for(2, to=address)) == 2
