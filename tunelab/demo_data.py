"""Synthetic customer-support instruction-tuning dataset for the ``tunelab demo``.

Deterministic generator (standard library only, no external data, no network) of
support tickets for the fictional outdoor shop "Northwind Outfitters": 20 intents in
7 categories, 60 records each, Alpaca format plus ``intent``/``category`` metadata.
Answers follow one house style (greeting, concrete steps and policies, short closing)
and copy the request's slot values (order number, product, email, address, ...).

Regenerate the committed files with::

    python -m tunelab.demo_data examples/data/support
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SHOP = "Northwind Outfitters"
SPLITS: tuple[str, ...] = ("train", "validation", "test")
RECORDS_PER_INTENT = 60
PER_INTENT: dict[str, int] = {"train": 52, "validation": 3, "test": 5}
ANSWER_WORDS = (25, 60)
REQUEST_WORDS = (8, 40)
FIELDS: tuple[str, ...] = ("id", "instruction", "input", "output", "intent", "category")

# --------------------------------------------------------------------------- slot values

PRODUCTS: tuple[tuple[str, str], ...] = (
    ("Summit Down Jacket", "apparel"), ("Ridgeline Rain Shell", "apparel"),
    ("Cascade Fleece Pullover", "apparel"), ("Timberline Flannel Shirt", "apparel"),
    ("Alpine Softshell Pants", "apparel"), ("Basecamp Merino Hoodie", "apparel"),
    ("Driftwood Hiking Shorts", "apparel"), ("Glacier Insulated Vest", "apparel"),
    ("Switchback Trail Tee", "apparel"), ("Aurora Thermal Leggings", "apparel"),
    ("Harbor Wool Sweater", "apparel"), ("Tundra Parka", "apparel"),
    ("Trailhead Hiking Boots", "footwear"), ("Ridgeback Trail Runners", "footwear"),
    ("Canyon Sandals", "footwear"), ("Pinecrest Winter Boots", "footwear"),
    ("Riverbend Water Shoes", "footwear"), ("Scree Approach Shoes", "footwear"),
    ("Meadow Camp Slippers", "footwear"),
    ("Trailblazer 40L Backpack", "pack"), ("Daytripper 22L Pack", "pack"),
    ("Voyager Duffel Bag", "pack"), ("Cliffside Climbing Pack", "pack"),
    ("Wanderer Hip Pack", "pack"),
    ("Northstar 2-Person Tent", "gear"), ("Emberlight Headlamp", "gear"),
    ("Solstice Sleeping Bag", "gear"), ("Rockhopper Trekking Poles", "gear"),
    ("Campfire Cook Set", "gear"), ("Riverstone Water Filter", "gear"),
    ("Horizon Camp Chair", "gear"), ("Lakeshore Insulated Bottle", "gear"),
    ("Pathfinder Compass Watch", "gear"),
)
SIZED_KINDS = ("apparel", "footwear")
SIZED_PRODUCTS = tuple(p for p in PRODUCTS if p[1] in SIZED_KINDS)
SIZES: dict[str, tuple[str, ...]] = {
    "apparel": ("small", "medium", "large"),
    "footwear": ("size 7", "size 8", "size 8.5", "size 9", "size 9.5", "size 10", "size 11", "size 12"),
}
# Warranty issues per product kind: (as the customer says it, as the agent names it).
ISSUES: dict[str, tuple[tuple[str, str], ...]] = {
    "apparel": (("the zipper broke", "a broken zipper"), ("a seam split open", "a split seam"),
                ("the waterproofing stopped working", "failed waterproofing")),
    "footwear": (("the sole is peeling off", "a peeling sole"), ("an eyelet ripped out", "a ripped eyelet"),
                 ("the seams started leaking", "leaking seams")),
    "pack": (("a shoulder strap tore off", "a torn shoulder strap"), ("the zipper broke", "a broken zipper"),
             ("the buckle snapped", "a snapped buckle")),
    "gear": (("it stopped working", "a defect"), ("a part snapped off", "a snapped part"),
             ("it cracked during normal use", "a crack")),
}
DAMAGE = ("crushed", "torn", "scratched", "broken", "stained", "dented", "ripped", "cracked")
NAMES = ("Maria", "James", "Aisha", "Chen", "Sofia", "Liam", "Priya", "Noah", "Fatima", "Lucas",
         "Emma", "Mateo", "Hana", "Oliver", "Zara", "Diego", "Grace", "Ethan", "Amara", "Jonas",
         "Leila", "Samuel", "Yuki", "Isabel", "Omar", "Chloe", "Ravi", "Nora", "Kofi", "Elena",
         "Tomas", "Mei")
SURNAMES = ("Lopez", "Smith", "Khan", "Wang", "Rossi", "Murphy", "Patel", "Brown", "Haddad", "Silva",
            "Jensen", "Garcia", "Sato", "Novak", "Okafor", "Schmidt", "Nguyen", "Kim", "Fischer", "Costa")
EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mailbox.example", "inbox.example",
                 "webmail.example")
CITIES = ("Portland", "Denver", "Seattle", "Boise", "Austin", "Minneapolis", "Burlington", "Asheville",
          "Salt Lake City", "Madison", "Spokane", "Bend", "Flagstaff", "Missoula", "Duluth", "Boulder",
          "Santa Fe", "Anchorage", "Chattanooga", "Bozeman")
STREETS = ("Maple Street", "Oak Avenue", "Cedar Lane", "Pine Road", "Birch Court", "Elm Street",
           "Willow Drive", "Aspen Way", "Lakeview Drive", "Hillcrest Road", "River Road", "Spruce Street",
           "Juniper Lane", "Summit Avenue", "Meadow Lane")
COUNTRIES = ("Canada", "Mexico", "the United Kingdom", "Germany", "France", "Japan", "Australia",
             "Ireland", "the Netherlands", "Sweden", "New Zealand", "Spain")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
CARDS = ("Visa", "Mastercard", "American Express", "Discover")
CODES = ("TRAIL10", "SUMMIT15", "WELCOME10", "CAMP20", "SPRING15", "HIKER10", "ALPINE25", "FALL20")
CLOSINGS = ("Happy trails!", "Have a great day!", "Enjoy your next adventure!")
# Appended to some requests; the answer then greets the customer by name.
SIGNATURES = (" Thanks, {name}", " - {name}", " Best, {name}", " Cheers, {name}")
FREE_SHIPPING_OVER = 75

# --------------------------------------------------------------------------- intents


@dataclass(frozen=True)
class Intent:
    name: str
    category: str
    requests: tuple[str, ...]
    answers: tuple[str, ...]


HI = "Hi {who}, thanks for reaching out"

INTENTS: tuple[Intent, ...] = (
    Intent("track_order", "ORDER", (
        "Hi, could you tell me where my order {order} is? I placed it on {date} and haven't received any update.",
        "where is order {order}?? its been a week already",
        "Status of order {order} please. Placed it on {date}.",
        "Hello! I ordered the {product} on {date} (order {order}) and I'd love to know when it will arrive.",
        "I've been waiting forever for order {order}. Nobody tells me anything. Where is it?",
        "hey can u check were my order {order} is, havent got a tracking email yet",
        "Good morning, is there a tracking number for order {order}? I'd like to follow the delivery.",
    ), (
        HI + ". You can follow {the_order} under Account > Orders > Track package. Standard delivery takes "
        "3-5 business days after shipping, and if tracking has not updated in 48 hours, reply here and we "
        "will contact the carrier. {closing}",
        HI + ". The live tracking link for {the_order} is under Account > Orders. Most orders arrive within "
        "3-5 business days of shipping. If nothing moves for 48 hours, just reply and we will chase the "
        "carrier for you. {closing}",
    )),
    Intent("cancel_order", "ORDER", (
        "Hi, I'd like to cancel order {order}, please. I ordered the wrong version of the {product}.",
        "cancel order {order} asap, I don't want it anymore",
        "Please cancel my order {order}. I placed it by mistake on {date}.",
        "Hello, is it still possible to cancel order {order}? I found the {product} cheaper elsewhere.",
        "I want order {order} cancelled NOW. I've asked twice already and nothing happened.",
        "can i cancle my order {order}? changed my mind about the {product}",
        "Good afternoon, please stop order {order} before it ships. Thank you!",
    ), (
        HI + ". I have requested cancellation of {the_order}. If it has not shipped yet, you will get a "
        "confirmation email within 2 hours and a full refund in 3-5 business days. If it already shipped, "
        "simply return it within 30 days. {closing}",
        HI + ". You can cancel {the_order} until it ships under Account > Orders > {order} > Cancel order, "
        "and the refund reaches your original payment method in 3-5 business days. Once it has shipped, "
        "return it within 30 days instead. {closing}",
    )),
    Intent("change_shipping_address", "ORDER", (
        "Hi, I moved last week. Can you send order {order} to {address} instead?",
        "change shipping address on {order} to {address}",
        "Hello, I entered the wrong address for order {order}. The correct one is {address}. Thanks so much!",
        "Please update the delivery address for order {order} to {address}, I won't be home at the old one.",
        "Your checkout saved my OLD address on order {order}. Fix it: {address}.",
        "pls ship order {order} to {address} insted of my old adress",
        "Good morning! Could order {order} be redirected to my office at {address}?",
    ), (
        HI + ". I have updated the shipping address for order {order} to {address}. Address changes are "
        "possible until the order ships, usually within 24 hours, and you will get an email confirming the "
        "new address. {closing}",
        HI + ". If order {order} has not shipped yet, go to Account > Orders > {order} > Edit address and "
        "enter {address}. Once an order has shipped, the carrier can redirect it from the tracking page "
        "instead. {closing}",
    )),
    Intent("request_refund", "REFUND", (
        "Hello, I'd like a refund for the {product} from order {order}. It just isn't what I expected.",
        "refund for order {order} please, wrong size on the {product}",
        "I want my money back for order {order}. Really unhappy with the {product}, nothing like the photos.",
        "Hi there, can I get a refund of {amount} for order {order}? I never used the {product}.",
        "hi, how do i get a refund for my {product}? order {order}, bought it on {date}",
        "Your {product}? Useless. Refund order {order} immediately.",
        "Good evening, I would like to request a refund for order {order}. Thank you for your help.",
    ), (
        HI + ". You can request a refund for {the_order} under Account > Orders > Request refund. Unused "
        "items are refundable within 30 days of delivery, and the money reaches your original payment "
        "method 5-7 business days after we receive the return. {closing}",
        HI + ". I have opened a refund request for {the_order} and emailed you a free return label. Send "
        "it back within 30 days; your refund is issued to the original payment method within 5-7 business "
        "days of arrival. {closing}",
    )),
    Intent("refund_status", "REFUND", (
        "Hi, I returned order {order} on {date}. When will I see my refund?",
        "refund status for {order}? sent it back on {date}",
        "Hello, could you check on the refund for order {order}? It was for {amount} and I still haven't "
        "received it.",
        "It's been weeks since I returned order {order}. Where is my {amount} refund??",
        "hey, my refund for order {order} hasnt showed up yet, returned it {date}",
        "Good morning, just checking whether my refund for order {order} has been processed. Thanks!",
    ), (
        HI + ". Returns for order {order}{sent_on} reach our warehouse within 5 business days, and the "
        "{refund} is issued 5-7 business days after that. You can see its status under Account > Orders > "
        "{order}. {closing}",
        HI + ". I checked order {order}: once the return is scanned at our warehouse, the {refund} goes back "
        "to your original payment method within 5-7 business days. If nothing arrives in 10 business days, "
        "reply here and we will escalate it. {closing}",
    )),
    Intent("return_item", "REFUND", (
        "Hi, how do I return the {product} from order {order}? It's too small.",
        "how do i return the {product}, order {order}",
        "Hello! I'd like to send back the {product} I got in order {order}. Do I need to print a label?",
        "Can I return the {product} from order {order}? I bought it on {date} and never used it.",
        "Your return page is broken and I need to return the {product} from order {order}. Help.",
        "hi i want to retrun my {product}, order number {order}, whats the process",
    ), (
        HI + ". To return the {product} from order {order}, go to Account > Orders > {order} > Return item "
        "and print the free prepaid label. Returns are accepted within 30 days of delivery, and refunds post "
        "5-7 business days after the item arrives. {closing}",
        HI + ". I have emailed you a free return label for the {product} from order {order}. Pack it in any "
        "box, drop it at a carrier location within 30 days, and your refund follows 5-7 business days after "
        "we receive it. {closing}",
    )),
    Intent("reset_password", "ACCOUNT", (
        "Hi, I forgot my password and can't log in. My account email is {email}.",
        "need a password reset for {email}, locked out",
        "Hello, the reset link never arrives when I try to reset my password. Account: {email}.",
        "I've tried to log in five times and your site keeps saying wrong password. Email is {email}. "
        "Fix this.",
        "cant login, forgot pasword, my email is {email}",
        "Good evening! Could you help me get back into my account? It's registered under {email}.",
    ), (
        HI + ". I have sent a password reset link to {email}. The link is valid for 24 hours; if it does "
        "not arrive within 10 minutes, check your spam folder or request a new one on the Sign in page. "
        "{closing}",
        HI + ". On the Sign in page, click Forgot password and enter {email}; you will receive a reset link "
        "valid for 24 hours. If nothing arrives within 10 minutes, check your spam folder and reply here. "
        "{closing}",
    )),
    Intent("delete_account", "ACCOUNT", (
        "Hello, I'd like to delete my Northwind account, registered under {email}. How do I do that?",
        "delete my account {email}, I don't want any more emails",
        "Please close my account ({email}) and remove all my personal data.",
        "I'm done with your store. Delete my account, {email}, today.",
        "how do i delet my acount? email is {email}",
        "Hi team, could you permanently remove the account linked to {email}? Thank you.",
    ), (
        HI + ". You can delete your account under Account > Settings > Delete account. We will send a "
        "confirmation link to {email}, and all personal data is permanently removed within 30 days. Open "
        "orders must be completed first. {closing}",
        HI + ". I have started the deletion of the account for {email}. Please confirm using the link we "
        "just emailed you; your personal data will then be permanently erased within 30 days. {closing}",
    )),
    Intent("update_payment_method", "ACCOUNT", (
        "Hi, my card expired. How do I add my new {card} ending in {last4} to my account?",
        "need to change payment card to {card} ending {last4}",
        "Hello! I'd like to replace the card on file with my {card} ending in {last4}. Can you help?",
        "Your site won't let me save my new {card} ({last4}). This is so frustrating.",
        "how to update payment method, new {card} card ending {last4}",
        "Good morning, please use my {card} ending {last4} for future orders instead of the old card.",
    ), (
        HI + ". Go to Account > Payment methods, click Add card and enter your {card} ending in {last4}, "
        "then select Make default. For your security, our team cannot enter card details for you. "
        "{closing}",
        HI + ". To switch to your {card} ending in {last4}, open Account > Payment methods, add the new card "
        "and set it as default. If saving fails, check that the billing address matches your bank "
        "statement. {closing}",
    )),
    Intent("change_email", "ACCOUNT", (
        "Hi, I'd like to change the email on my account from {email} to {new_email}.",
        "please change my account email from {email} to {new_email}",
        "Hello, I no longer use {email}. Could you switch my account to {new_email}?",
        "I've lost access to {email} and can't get your emails. Update it to {new_email} now.",
        "hi can u update my emial to {new_email}, old one is {email}",
        "Good afternoon! Please replace {email} with {new_email} on my Northwind account. Thanks a lot.",
    ), (
        HI + ". Go to Account > Profile > Email, replace {email} with {new_email} and click Save. We will "
        "send a verification link to {new_email}, and the change takes effect once you click it. {closing}",
        HI + ". I have started the switch from {email} to {new_email}. Please open the verification link we "
        "just sent to {new_email} within 24 hours to confirm the change. {closing}",
    )),
    Intent("product_availability", "PRODUCT", (
        "Hi, do you have the {product} in stock in {size}? I'd like to order this week.",
        "when will you restock the {product}, been waiting weeks",
        "Hello! Do you have the {product} available? I'd like to pick one up before my trip.",
        "Your site has shown the {product} as sold out for a MONTH. When is it coming back?",
        "do u have the {product} in {size}, cant see it on the site",
        "Good morning, will the {product} be restocked soon? Thanks in advance!",
    ), (
        HI + ". Live stock for the {product}{in_size} is shown on its product page. If it shows Sold out, "
        "click Notify me and we will email you the moment it is back; restocks usually take 2-3 weeks. "
        "{closing}",
        HI + ". We restock the {product}{in_size} every 2-3 weeks. On the product page, click Notify me to "
        "get an email as soon as it is available, and you can order it right away. {closing}",
    )),
    Intent("warranty_claim", "PRODUCT", (
        "Hi, I bought the {product} last year and {issue}. Is that covered by the warranty?",
        "warranty claim: {product}, {issue} after a few months",
        "Hello, I've had my {product} for only a few months and {issue}. How do I make a warranty claim?",
        "Really disappointed. I paid good money for the {product} and {issue} already. What are you going "
        "to do about it?",
        "my {product}: {issue}. is this under warrenty?",
        "Good afternoon! I bought my {product} on {date} and now {issue}. Can it be repaired or replaced?",
    ), (
        HI + ". Our 2-year warranty on the {product} covers {issue_ans}. Please reply with a photo and "
        "your order number or receipt, and we will send a free repair or replacement within 10 business "
        "days. {closing}",
        HI + ", and I'm sorry about {issue_ans} on your {product}. This is covered by our 2-year warranty: "
        "submit a photo under Account > Warranty claims, and we will repair or replace it free of charge. "
        "{closing}",
    )),
    Intent("product_sizing", "PRODUCT", (
        "Hi, I usually wear a {size}. Which size of the {product} should I order?",
        "do your {product} sizes run small? normally a {size}",
        "Hello! I'm between sizes. I normally take a {size}; what size {product} would you recommend?",
        "Last time your sizing was way off. I'm a {size}, so what size {product} do I actually need?",
        "hi, wich size for the {product} if im usually {size}?",
        "Good morning, is sizing on the {product} true to size? I'm a {size} in most brands.",
    ), (
        HI + ". Sizing for the {product} is true to size, so we recommend your usual {size}. The size chart on the "
        "product page lists exact measurements, and exchanges are free within 30 days if the fit is not "
        "right. {closing}",
        HI + ". Since you usually wear a {size}, order the {product} in {size}, as the fit is true to size. If "
        "it does not fit, exchange it for free within 30 days under Account > Orders. {closing}",
    )),
    Intent("delivery_delay", "SHIPPING", (
        "Hi, order {order} was supposed to arrive on {date} but it still hasn't come. Can you check?",
        "order {order} late. expected {date}. where is it",
        "Hello, my package for order {order} seems stuck in {city} for days. Is something wrong?",
        "This is ridiculous. Order {order} was due {date} and it's still not here. I needed it for a trip!",
        "my order {order} is late, it was meant to be here {date}",
        "Good evening! I'm a bit worried, order {order} should have arrived by {date}. Any news?",
    ), (
        HI + ", and I'm sorry order {order} has not arrived{due}. I have opened a trace with the carrier. "
        "If it is not delivered within 5 business days, we will ship a free replacement or issue a full "
        "refund. {closing}",
        HI + ", and I'm sorry about the delay with order {order}. Carriers are running 2-3 days behind, so "
        "please allow 5 more business days. If it still has not arrived by then, reply here for a free "
        "replacement or refund. {closing}",
    )),
    Intent("shipping_cost", "SHIPPING", (
        "Hi, how much is shipping to {city} for an order of {cart}?",
        "what's the shipping cost for a {cart} order to {city}?",
        "Hello! My cart comes to {cart}. Do I get free shipping, or how much will delivery be?",
        "Why is shipping so expensive? My cart is {cart} and I'm just in {city}.",
        "hi do i pay shiping on {cart}? delivering to {city}",
        "Good afternoon, what would standard delivery cost on an order of {cart}? Thank you!",
    ), (
        HI + ". Standard shipping{to_city} takes 3-5 business days, and {verdict}. Express delivery in 1-2 "
        "business days is $14.95 and can be selected at checkout. {closing}",
        HI + ". For a cart of {cart}, {verdict_short}. Standard delivery{to_city} takes 3-5 business days, "
        "and the exact cost always appears at checkout before you pay. {closing}",
    )),
    Intent("international_shipping", "SHIPPING", (
        "Hi, do you ship to {country}? I'd love to order the {product}.",
        "do you ship to {country}? how long does it take",
        "Hello! I live in {country}. Can I order from Northwind, and what about customs fees?",
        "Why can't I select {country} at checkout? I want to buy the {product}!",
        "do u deliver to {country}, and how much are the dutys",
        "Good morning, what are the delivery times and costs for shipping to {country}? Thank you.",
    ), (
        HI + ". Yes, we ship to {country}.{item_note} International delivery takes 7-14 business days and "
        "costs $19.95, free on orders over $150. Duties and taxes are calculated at checkout, so there are "
        "no surprise fees. {closing}",
        HI + ". We deliver to {country} in 7-14 business days for a flat $19.95, or free on orders over "
        "$150.{item_note} Select {country} at checkout to see duties and taxes before you pay. {closing}",
    )),
    Intent("damaged_item", "COMPLAINT", (
        "Hi, the {product} from order {order} arrived {damage}. What can I do?",
        "order {order}: {product} arrived {damage}. need a replacement",
        "Hello, I'm sorry to report that my {product} (order {order}) arrived {damage}. How do we fix this?",
        "Unbelievable. I waited two weeks and the {product} in order {order} arrived {damage}. I want this "
        "sorted today.",
        "my {product} came {damage}, order {order}, what now",
        "Good afternoon! Order {order} arrived today, but I found the {product} {damage}. Could you help?",
    ), (
        HI + ", and I'm sorry the {product} from order {order} arrived {damage}. Please reply with a photo "
        "of the damage within 14 days, and we will ship a free replacement or issue a full refund, "
        "whichever you prefer. {closing}",
        HI + ", and I'm sorry about the {damage} {product} in order {order}. Upload a photo under Account > "
        "Orders > {order} > Report a problem, and we will send a free replacement within 2 business days. "
        "No need to return it. {closing}",
    )),
    Intent("wrong_item", "COMPLAINT", (
        "Hi, I ordered the {product} (order {order}) but received the {wrong_product} instead.",
        "wrong item in order {order}. got {wrong_product}, ordered {product}",
        "Hello, there seems to be a mix-up with order {order}: I got the {wrong_product} instead of the "
        "{product}.",
        "Seriously? I paid for the {product} and you sent me the {wrong_product}. Order {order}. Fix it.",
        "recieved the wrong thing for order {order}, its the {wrong_product} not the {product}",
        "Good morning! Order {order} came today with the {wrong_product} in the box instead of my "
        "{product}. Thanks for checking.",
    ), (
        HI + ", and I'm sorry you received the {wrong_product} instead of the {product} in order {order}. "
        "We are shipping the {product} today at no cost, and a prepaid label for the {wrong_product} is in "
        "your inbox. {closing}",
        HI + ", and I'm sorry for the mix-up in order {order}. I have sent you a free return label for the "
        "{wrong_product}; the correct {product} ships within 1 business day, and you will get tracking by "
        "email. {closing}",
    )),
    Intent("duplicate_charge", "BILLING", (
        "Hi, I was charged {amount} twice for order {order}. Can you refund one of them?",
        "double charge of {amount} on order {order}, please fix",
        "Hello, my bank statement shows two payments of {amount} for order {order}. Could you look into it?",
        "You charged my card twice for order {order}! That's {amount} extra. I want it back today.",
        "hi, got chraged twice for {order}, {amount} each time",
        "Good evening, I think order {order} was billed twice ({amount} each). Thanks for checking.",
    ), (
        HI + ". The second {amount} charge for order {order} is a temporary authorization hold, and it "
        "disappears within 3-5 business days. If it is still there after that, reply with a screenshot of "
        "your statement and we will refund it right away. {closing}",
        HI + ". I checked order {order}: only one {amount} payment was captured. The duplicate is a pending "
        "hold that your bank releases within 3-5 business days; if it stays longer, reply here and we will "
        "refund it. {closing}",
    )),
    Intent("apply_discount_code", "BILLING", (
        "Hi, I forgot to enter code {code} on order {order}. Can you still apply it?",
        "code {code} didn't work on order {order}, please apply it",
        "Hello! I placed order {order} yesterday and only just saw the {code} promo. Is it too late?",
        "Your code {code} was rejected at checkout, so order {order} cost me full price. Not happy.",
        "hey can u add discount {code} to my order {order}? forgot it",
        "Good afternoon, could the code {code} be applied to order {order} after purchase? Thank you!",
    ), (
        HI + ". Codes can be added within 14 days of purchase, so I have applied {code} to order {order}. "
        "The difference goes back to your original payment method within 3-5 business days. {closing}",
        HI + ". Code {code} can still be applied to order {order}, since it was placed within the last 14 "
        "days. I have refunded the discount to your original payment method; it shows up in 3-5 business "
        "days. {closing}",
    )),
)

# --------------------------------------------------------------------------- generation


def _email(rng: random.Random, first: str) -> str:
    last = rng.choice(SURNAMES).lower()
    first = first.lower()
    local = rng.choice((f"{first}.{last}", f"{first}{rng.randint(1, 99)}", f"{first[0]}{last}",
                        f"{first}_{last}"))
    return f"{local}@{rng.choice(EMAIL_DOMAINS)}"


def _money(rng: random.Random, lo: int, hi: int) -> tuple[str, float]:
    cents = rng.randint(lo * 100, hi * 100)
    return f"${cents // 100}.{cents % 100:02d}", cents / 100


def _draw_slots(rng: random.Random) -> dict[str, str]:
    """All slot values for one record (always the same draws, so the stream stays aligned)."""
    product, kind = rng.choice(PRODUCTS)
    sized_product, sized_kind = rng.choice(SIZED_PRODUCTS)
    wrong_product = rng.choice([p[0] for p in PRODUCTS if p[0] != product])
    issue, issue_ans = rng.choice(ISSUES[kind])
    name = rng.choice(NAMES)
    email = _email(rng, name)
    new_email = _email(rng, name)
    while new_email == email:
        new_email = _email(rng, name)
    city = rng.choice(CITIES)
    amount, _ = _money(rng, 18, 260)
    cart, cart_value = _money(rng, 20, 140)
    return {
        "order": f"NW-{rng.randint(0, 999_999):06d}",
        "product": product,
        "sized_product": sized_product,
        "size": rng.choice(SIZES[sized_kind]),
        "wrong_product": wrong_product,
        "issue": issue,
        "issue_ans": issue_ans,
        "damage": rng.choice(DAMAGE),
        "name": name,
        "email": email,
        "new_email": new_email,
        "city": city,
        "address": f"{rng.randint(1, 2999)} {rng.choice(STREETS)}, {city}",
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "amount": amount,
        "cart": cart,
        "free_shipping": "yes" if cart_value >= FREE_SHIPPING_OVER else "no",
        "country": rng.choice(COUNTRIES),
        "card": rng.choice(CARDS),
        "last4": f"{rng.randint(0, 9999):04d}",
        "code": rng.choice(CODES),
        "closing": rng.choice(CLOSINGS),
        "signature": rng.choice(SIGNATURES),
        "signed": "yes" if rng.random() < 0.4 else "no",
    }


def _answer_fields(slots: dict[str, str], template: str) -> dict[str, str]:
    """Slot values plus the derived phrases that depend on what the request mentioned."""
    used = lambda key: "{" + key + "}" in template  # noqa: E731
    s = dict(slots)
    if used("size"):  # sizes only make sense for apparel and footwear
        s["product"] = s["sized_product"]
    s["who"] = s["name"] if used("name") else "there"
    s["the_order"] = f"your {s['product']} from order {s['order']}" if used("product") else f"order {s['order']}"
    s["in_size"] = f" in {s['size']}" if used("size") else ""
    s["due"] = f" by {s['date']}" if used("date") else ""
    s["sent_on"] = f" sent back on {s['date']}" if used("date") else ""
    s["refund"] = f"{s['amount']} refund" if used("amount") else "refund"
    s["to_city"] = f" to {s['city']}" if used("city") else ""
    s["item_note"] = f" You can order the {s['product']} for international delivery too." if used("product") else ""
    if s["free_shipping"] == "yes":
        s["verdict"] = f"your {s['cart']} order qualifies for free shipping because it is over ${FREE_SHIPPING_OVER}"
        s["verdict_short"] = f"shipping is free, since orders over ${FREE_SHIPPING_OVER} ship free"
    else:
        s["verdict"] = (f"standard shipping on your {s['cart']} order is $5.95, while orders over "
                        f"${FREE_SHIPPING_OVER} ship free")
        s["verdict_short"] = f"standard shipping is $5.95, since only orders over ${FREE_SHIPPING_OVER} ship free"
    return s


def _make_pair(rng: random.Random, intent: Intent) -> tuple[str, str]:
    slots = _draw_slots(rng)
    template = rng.choice(intent.requests)
    if slots["signed"] == "yes" and "{name}" not in template:
        signature = slots["signature"]
        if "thank" in template.lower() and "Thanks" in signature:
            signature = " - {name}"
        template = template + signature
    fields = _answer_fields(slots, template)
    instruction = template.format(**fields)
    output = rng.choice(intent.answers).format(**fields)
    return instruction, output


def _check_lengths(instruction: str, output: str, intent: str) -> None:
    n_req, n_ans = len(instruction.split()), len(output.split())
    if not REQUEST_WORDS[0] <= n_req <= REQUEST_WORDS[1]:
        raise ValueError(f"{intent}: request has {n_req} words: {instruction!r}")
    if not ANSWER_WORDS[0] <= n_ans <= ANSWER_WORDS[1]:
        raise ValueError(f"{intent}: answer has {n_ans} words: {output!r}")


def build_support_dataset(seed: int = 0) -> dict[str, list[dict]]:
    """The dataset as ``{"train": [...], "validation": [...], "test": [...]}``, stratified by intent."""
    if sum(PER_INTENT.values()) != RECORDS_PER_INTENT:
        raise ValueError("PER_INTENT does not add up to RECORDS_PER_INTENT")
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for intent in INTENTS:
        rows: list[dict] = []
        attempts = 0
        while len(rows) < RECORDS_PER_INTENT:
            attempts += 1
            if attempts > 100 * RECORDS_PER_INTENT:
                raise RuntimeError(f"{intent.name}: cannot draw {RECORDS_PER_INTENT} distinct requests")
            instruction, output = _make_pair(rng, intent)
            if instruction in seen:
                continue
            seen.add(instruction)
            _check_lengths(instruction, output, intent.name)
            rows.append({"instruction": instruction, "input": "", "output": output,
                         "intent": intent.name, "category": intent.category})
        start = 0
        for split in ("validation", "test", "train"):
            splits[split].extend(rows[start:start + PER_INTENT[split]])
            start += PER_INTENT[split]
    n = 0
    for split in SPLITS:
        rng.shuffle(splits[split])
        numbered = []
        for row in splits[split]:
            n += 1
            numbered.append({"id": f"support-{n:05d}", **row})
        splits[split] = [{k: rec[k] for k in FIELDS} for rec in numbered]
    return splits


def write_support_dataset(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` to ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, records in build_support_dataset(seed).items():
        path = out / f"{split}.jsonl"
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        path.write_bytes(text.encode("utf-8"))
        paths[split] = path
    return paths


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "examples/data/support"
    for split_name, split_path in write_support_dataset(target).items():
        n_lines = len(split_path.read_text(encoding="utf-8").splitlines())
        print(f"{split_name}: {n_lines} records -> {split_path}")
